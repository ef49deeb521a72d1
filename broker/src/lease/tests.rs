//! Which pods' leases are recorded.

use super::*;
use crate::identity::ObjectRef;

fn with_pod(uid: &str) -> Identity {
    Identity {
        namespace: "shop".into(),
        service_account: "orders".into(),
        service_account_uid: String::new(),
        pod: Some(ObjectRef {
            name: "orders-1".into(),
            uid: uid.into(),
        }),
        node: None,
        pod_labels: None,
        expires_at: 0,
    }
}

#[test]
fn leases_are_recorded_only_under_uids_that_are_plain_names() {
    assert!(owner(&with_pod("6f1c2a9e-0b7d-4a51-9e43-0c6f2d1b8a77")).is_some());
    for odd in ["", "../other", "a/b", "a_b", "x".repeat(254).as_str()] {
        assert!(owner(&with_pod(odd)).is_none(), "{odd}");
    }
    let mut no_pod = with_pod("u");
    no_pod.pod = None;
    assert!(owner(&no_pod).is_none());
}
