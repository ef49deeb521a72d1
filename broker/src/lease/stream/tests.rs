//! The stream state machine's decisions: policy changes, per-pod counts.

use super::*;
use crate::{
    identity::{Identity, ObjectRef},
    policy::Policy,
};

fn policy(ttl: &str, grant_cache: bool) -> Policy {
    let cache = if grant_cache {
        "  - name: cache
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/cache } }
"
    } else {
        ""
    };
    let text = format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: db
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ database: {{ mount: database, role: orders }} }}
    ttl: {ttl}
{cache}"
    );
    Policy::parse(&text, "policy.yaml").unwrap()
}

fn orders() -> Identity {
    Identity {
        namespace: "shop".into(),
        service_account: "orders".into(),
        service_account_uid: String::new(),
        pod: Some(ObjectRef {
            name: "orders-0".into(),
            uid: "uid-0".into(),
        }),
        node: None,
        pod_labels: None,
        expires_at: 0,
    }
}

fn granted(policy: &Policy) -> Vec<Arc<Binding>> {
    ["db", "cache"]
        .iter()
        .filter_map(|name| policy.lookup(&orders(), name))
        .map(|b| Arc::new(b.clone()))
        .collect()
}

#[test]
fn a_new_generation_ends_a_stream_only_for_bindings_it_changed() {
    let before = policy("1h", true);
    let streamed = granted(&before);
    let same = policy("1h", true);
    assert!(
        changed_bindings(&streamed, |name| same.lookup(&orders(), name).cloned()).is_empty(),
        "an identical policy changes nothing"
    );

    let longer = policy("2h", true);
    assert_eq!(
        changed_bindings(&streamed, |name| longer.lookup(&orders(), name).cloned()),
        [("db".to_owned(), false)],
        "a changed ttl changes db only"
    );
    let withdrawn = policy("1h", false);
    assert_eq!(
        changed_bindings(&streamed, |name| withdrawn.lookup(&orders(), name).cloned()),
        [("cache".to_owned(), true)],
        "a removed grant is withdrawn"
    );
}

#[test]
fn open_streams_are_counted_per_pod_and_leased_binding_and_released() {
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let caller = Caller {
        identity: orders(),
        peer: None,
        bearer: None,
    };
    let bindings = granted(&policy("1h", true));
    let mut held = Vec::new();
    for _ in 0..MAX_STREAMS_PER_POD_BINDING {
        held.push(open(&counts, &caller, &bindings).unwrap());
    }
    let refused = open(&counts, &caller, &bindings).err().unwrap();
    assert!(
        matches!(&refused, Error::TooManyStreams { binding, .. } if binding == "db"),
        "{refused}"
    );
    held.pop();
    assert!(
        open(&counts, &caller, &bindings).is_ok(),
        "a closed stream frees its place"
    );
    drop(held);
    assert!(counts.lock().unwrap().len() <= 1);
    let kv_only: Vec<_> = bindings.into_iter().filter(|b| b.name == "cache").collect();
    for _ in 0..10 {
        let slots = open(&counts, &caller, &kv_only).unwrap();
        assert!(
            slots.keys.is_empty(),
            "KV streams hold no lease and are not counted"
        );
    }
}
