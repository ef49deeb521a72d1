//! Vault reachability checks (time injected) and how answers are sorted.

use super::*;

const IDLE: Duration = Duration::from_secs(30);

#[test]
fn a_busy_broker_never_checks_vault_separately() {
    let start = Instant::now();
    let mut reach = Reachability::default();
    assert!(reach.check_due(start, IDLE), "nothing known yet: check");
    for second in 1..120 {
        // A request succeeded every second.
        let now = start + Duration::from_secs(second);
        reach.last_ok = Some(now);
        assert!(!reach.check_due(now, IDLE), "at {second}s");
    }
}

#[test]
fn an_idle_broker_checks_once_per_interval() {
    let start = Instant::now();
    let mut reach = Reachability {
        last_ok: Some(start),
        ..Reachability::default()
    };
    let at = |s: u64| start + Duration::from_secs(s);
    assert!(!reach.check_due(at(29), IDLE));
    assert!(reach.check_due(at(30), IDLE));
    assert!(!reach.check_due(at(31), IDLE), "just checked");
    assert!(reach.check_due(at(60), IDLE));
}

#[test]
fn an_idle_replica_whose_peer_hears_from_vault_does_not_check_until_it_finds_vault_down() {
    let start = Instant::now();
    let mut reach = Reachability {
        last_ok: Some(start),
        ..Reachability::default()
    };
    let at = |s: u64| start + Duration::from_secs(s);
    for second in (10..120).step_by(10) {
        // A peer's requests succeed; it says so every ten seconds.
        reach.peer_ok = Some(at(second));
        assert!(!reach.check_due(at(second + 5), IDLE), "at {second}s");
    }
    // A request of its own failed: its own checks, every two seconds,
    // whatever the peers say.
    reach.down = true;
    reach.peer_ok = Some(at(130));
    assert!(reach.check_due(at(130), IDLE));
    assert!(reach.check_due(at(132), IDLE));
    // The peers fell silent: after two intervals without their word, its
    // own check once an interval again.
    reach.down = false;
    assert!(!reach.check_due(at(189), IDLE));
    assert!(reach.check_due(at(191), IDLE));
    assert!(!reach.check_due(at(220), IDLE));
    assert!(reach.check_due(at(221), IDLE));
}

#[test]
fn a_vault_that_is_down_is_checked_every_two_seconds() {
    let start = Instant::now();
    let mut reach = Reachability {
        down: true,
        last_check: Some(start),
        ..Reachability::default()
    };
    let at = |ms: u64| start + Duration::from_millis(ms);
    assert!(!reach.check_due(at(1_999), IDLE));
    assert!(reach.check_due(at(2_000), IDLE));
    assert!(!reach.check_due(at(3_000), IDLE));
    assert!(reach.check_due(at(4_000), IDLE));
}

#[test]
fn vault_answers_sort_into_what_the_caller_can_do() {
    let api = |code: u16| ClientError::APIError {
        code,
        errors: vec!["why".into()],
    };
    assert!(matches!(
        VaultError::from_client("x", api(403)),
        VaultError::Denied(_)
    ));
    assert!(matches!(
        VaultError::from_client("x", api(404)),
        VaultError::NotFound(_)
    ));
    assert!(matches!(
        VaultError::from_client("x", api(400)),
        VaultError::Invalid(_)
    ));
    for code in [429, 500, 502, 503] {
        assert!(
            matches!(
                VaultError::from_client("x", api(code)),
                VaultError::Unavailable(_)
            ),
            "{code}"
        );
    }
    assert!(matches!(
        VaultError::from_client("x", api(418)),
        VaultError::Unexpected { .. }
    ));
}
