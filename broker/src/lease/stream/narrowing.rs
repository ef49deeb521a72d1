//! A caller's own shorter TTLs per binding (`max_ttl_seconds`), checked
//! against the policy's floors and applied to the bindings it asked for.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A caller's own shorter TTLs per binding (`max_ttl_seconds`).
#[derive(Clone, Debug, Default)]
pub struct Narrowing(std::collections::BTreeMap<String, Duration>);

impl Narrowing {
    /// Checks what a caller asked for against the bindings it asked for.
    ///
    /// # Errors
    /// A sentence for `INVALID_ARGUMENT`: a binding not requested, a KV
    /// binding (nothing to expire), or a TTL below the policy's floor.
    pub fn from_request(
        asked: &std::collections::BTreeMap<String, u32>,
        bindings: &[Arc<Binding>],
    ) -> Result<Self, String> {
        let mut narrowing = std::collections::BTreeMap::new();
        for (name, seconds) in asked {
            let Some(binding) = bindings.iter().find(|b| &b.name == name) else {
                return Err(format!(
                    "max_ttl_seconds names `{}`, which the request does not ask for",
                    crate::text::printable(name)
                ));
            };
            if !binding.source.is_leased() {
                return Err(format!(
                    "max_ttl_seconds: `{name}` is a KV secret; only leased credentials have a TTL"
                ));
            }
            let max = Duration::from_secs(u64::from(*seconds));
            if let Err(floor) = binding.narrowed(max) {
                return Err(format!("max_ttl_seconds: `{name}`: {floor}"));
            }
            narrowing.insert(name.clone(), max);
        }
        Ok(Self(narrowing))
    }

    /// `binding` as this caller gets it. A TTL the policy's floor no longer
    /// allows (the floor was raised since the request) leaves the binding
    /// as the policy has it; an open stream then ends `POLICY_CHANGED` and
    /// the caller's next request is refused, naming the floor.
    pub fn apply(&self, binding: &Binding) -> Binding {
        match self.0.get(&binding.name) {
            Some(max) => binding.narrowed(*max).unwrap_or_else(|_| binding.clone()),
            None => binding.clone(),
        }
    }
}
