//! The per-pod count of open streams on leased bindings: a stream takes a
//! place on each of its leased bindings and gives it back when it ends.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Takes a place for the caller's pod on each leased binding in `counts`.
pub(super) fn open(
    counts: &Arc<Mutex<HashMap<(String, String), usize>>>,
    caller: &Caller,
    bindings: &[Arc<Binding>],
) -> Result<Slots, Error> {
    let mut slots = Slots {
        counts: counts.clone(),
        keys: Vec::new(),
    };
    let Some(pod) = &caller.identity.pod else {
        return Ok(slots);
    };
    let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
    for binding in bindings.iter().filter(|b| b.source.is_leased()) {
        let key = (pod.uid.clone(), binding.name.clone());
        let count = counts.entry(key.clone()).or_default();
        if *count >= MAX_STREAMS_PER_POD_BINDING {
            return Err(Error::TooManyStreams {
                binding: binding.name.clone(),
                limit: MAX_STREAMS_PER_POD_BINDING,
            });
        }
        *count += 1;
        slots.keys.push(key);
    }
    Ok(slots)
}

/// A stream's places in the per-pod counts; released when it ends.
pub struct Slots {
    pub(super) counts: Arc<Mutex<HashMap<(String, String), usize>>>,
    pub(super) keys: Vec<(String, String)>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for key in self.keys.drain(..) {
            if let Some(count) = counts.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }
    }
}
