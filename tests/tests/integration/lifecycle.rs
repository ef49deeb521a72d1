//! Leased credentials end to end, against real OpenBao and a real PostgreSQL
//! (a private cluster with password authentication, so a login proves the
//! password): issue, log in, renew, rotate with overlap, revoke, one database
//! user per pod, handles bound to their pod, certificates.

use std::{
    fs,
    time::{Duration, Instant},
};

use tessera_proto::v1::{FetchRequest, Held, RevokeRequest};
use tessera_tests::{Env, Postgres, db_policy, field, http_get, wait_for, with_token};
use tonic::Code;

/// A private PostgreSQL, and a broker whose binding `db` issues users of
/// role `orders` (Vault lease TTLs `role_ttl`, max `role_max`).
async fn db_env(policy: &str, role_ttl: &str, role_max: &str) -> (Postgres, Env) {
    let pg = Postgres::start();
    let env = Env::start(policy).await;
    env.bao.database_role(&pg, "orders", role_ttl, role_max);
    (pg, env)
}

/// Runs `tessera-sidecar once` for `db` as shop/orders; it must succeed.
fn once(env: &Env, out: &std::path::Path) {
    let output = env.sidecar_once(&env.token_file("shop", "orders"), out, &["db"], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn login(out: &std::path::Path) -> (String, String) {
    (
        field(out, "db", "username").unwrap(),
        field(out, "db", "password").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn database_credentials_log_in_and_fail_after_revoke() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "10s"), "60s", "120s").await;
    let out = env.tmpfs_out();
    once(&env, out.path());
    let (user, password) = login(out.path());
    assert!(
        pg.can_login(&user, &password),
        "the delivered password logs in"
    );
    assert!(
        !pg.can_login(&user, "not-the-password"),
        "the server really checks passwords"
    );
    assert_eq!(pg.vault_roles(), 1);

    let handle = fs::read_to_string(out.path().join("db/..data/..handle")).unwrap();
    let revoked = env
        .revoke_held(&env.token("shop", "orders"), &[("db", &handle)])
        .await;
    assert_eq!(revoked, ["db"]);
    assert!(
        !pg.can_login(&user, &password),
        "a revoked credential no longer logs in"
    );
    assert_eq!(pg.vault_roles(), 0);
    let event = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "issue")
        .unwrap();
    assert_eq!(event["source"], "database database/creds/orders");
    assert!(
        event["lease_id_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64)
    );
    assert!(
        event["ttl_seconds"]
            .as_u64()
            .is_some_and(|t| t > 0 && t <= 60)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn init_once_then_run_and_a_sidecar_restart_mint_one_database_user() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "10s"), "60s", "120s").await;
    let out = env.tmpfs_out();
    let token_file = env.token_file("shop", "orders");

    once(&env, out.path());
    let first = login(out.path());

    let run = env.sidecar_run(&token_file, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "the sidecar to resume", || {
        run.output().contains("files kept").then_some(())
    })
    .await;
    // SIGKILL: a crash, not a shutdown, so nothing is revoked.
    drop(run);
    let mut restarted = env.sidecar_run(&token_file, out.path(), &["db"]);
    wait_for(
        Duration::from_secs(20),
        "the restarted sidecar to resume",
        || restarted.output().contains("files kept").then_some(()),
    )
    .await;

    assert_eq!(
        login(out.path()),
        first,
        "the pod kept its first credential"
    );
    assert_eq!(
        pg.vault_roles(),
        1,
        "one database user for the pod's whole life"
    );
    assert!(pg.can_login(&first.0, &first.1));
    // The crashed sidecar's stream is gone; the live one holds one lease.
    wait_active_leases(&env, 1).await;

    // Pod shutdown: SIGTERM revokes what the pod holds.
    assert_eq!(restarted.terminate(), Some(0));
    assert!(!pg.can_login(&first.0, &first.1), "revoked on SIGTERM");
    assert_eq!(pg.vault_roles(), 0);
    wait_active_leases(&env, 0).await;
}

/// Waits until the broker reports `expected` active leases for `db`.
async fn wait_active_leases(env: &Env, expected: u64) {
    let line = format!("tessera_active_leases{{binding=\"db\"}} {expected}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = http_get(&format!("{}/metrics", env.admin_url)).await;
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{line}` in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handle_presented_by_another_pod_is_refused() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "10s"), "60s", "120s").await;
    let out = env.tmpfs_out();
    once(&env, out.path());
    let handle = fs::read_to_string(out.path().join("db/..data/..handle")).unwrap();

    let mut other = tessera_broker::dev::TokenSpec::new("shop", "orders");
    other.pod = Some("orders-7".into());
    let thief = env.signer.mint(&other);
    let mut client = env.client().await;
    let held = vec![Held {
        binding: "db".into(),
        handle: handle.clone(),
    }];
    let status = client
        .fetch(with_token(
            &thief,
            FetchRequest {
                bindings: vec!["db".into()],
                held: held.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = client
        .revoke(with_token(
            &thief,
            RevokeRequest {
                bindings: vec![],
                held,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (user, password) = login(out.path());
    assert!(
        pg.can_login(&user, &password),
        "the owner's lease is untouched"
    );

    // A handle that does not open (forged, another deployment's, sealed
    // under a replaced key) counts as none held: the pod gets a fresh
    // credential, never the lease it names, and the security team hears of it.
    let forged = format!("{}x", handle.trim_end_matches('x'));
    let answer = client
        .fetch(with_token(
            &env.token("shop", "orders"),
            FetchRequest {
                bindings: vec!["db".into()],
                held: vec![Held {
                    binding: "db".into(),
                    handle: forged,
                }],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let fresh = &answer.credentials[0];
    assert!(!fresh.unchanged, "a fresh credential, not a resumed one");
    assert_ne!(fresh.fields["username"], user.as_bytes());
    let refusal = env
        .audit_events()
        .into_iter()
        .find(|e| {
            e["outcome"] == "denied"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("does not open"))
        })
        .expect("the unreadable handle is audited");
    assert_eq!(refusal["binding"], "db");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_extends_the_lease_and_keeps_the_user() {
    let (pg, env) = db_env(&db_policy("6s", "0.5", "1s"), "6s", "60s").await;
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let first = login(out.path());
    // Handles are sealed: the lease id comes from Vault, which holds one.
    let leases = env.bao.leases("database/creds/orders");
    assert_eq!(leases.len(), 1, "{leases:?}");
    let lease = leases[0].clone();
    let expire = |bao: &tessera_tests::OpenBao| {
        bao.lease_lookup(&lease).unwrap()["expire_time"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = expire(&env.bao);

    wait_for(Duration::from_secs(30), "a renewal", || {
        env.audit_events()
            .iter()
            .any(|e| e["action"] == "renew" && e["outcome"] == "success")
            .then_some(())
    })
    .await;
    let after = expire(&env.bao);
    assert!(
        after > before,
        "OpenBao's lease expiry moved: {before} -> {after}"
    );
    assert_eq!(login(out.path()), first, "renewal keeps the same user");
    assert!(pg.can_login(&first.0, &first.1));
    assert_eq!(pg.vault_roles(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_delivers_before_expiry_and_revokes_the_old_user_after_the_overlap() {
    let (pg, env) = db_env(&db_policy("6s", "0.5", "3s"), "6s", "10s").await;
    let out = env.tmpfs_out();
    let notified = env.dir.path().join("notified");
    let hook = format!(
        "echo \"$TESSERA_BINDING $TESSERA_VERSION\" >> {}",
        notified.display()
    );
    let _run = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["db"],
        &["--notify-command", &hook],
    );
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let old = login(out.path());

    let new = wait_for(Duration::from_secs(40), "a rotation", || {
        field(out.path(), "db", "username")
            .filter(|user| *user != old.0)
            .map(|_| login(out.path()))
    })
    .await;
    let rotated_at = Instant::now();
    assert!(pg.can_login(&new.0, &new.1), "the new credential works");
    let old_still_valid = pg.can_login(&old.0, &old.1);
    assert!(
        old_still_valid,
        "the old credential still works during the overlap"
    );
    wait_for(
        Duration::from_secs(20),
        "the old credential to be revoked",
        || (!pg.can_login(&old.0, &old.1)).then_some(()),
    )
    .await;
    assert!(
        rotated_at.elapsed() >= Duration::from_millis(500),
        "revoked after the overlap, not at once"
    );
    assert!(pg.can_login(&new.0, &new.1));

    let lines = fs::read_to_string(&notified).unwrap_or_default();
    let versions: Vec<&str> = lines.lines().collect();
    assert_eq!(
        versions.len(),
        1,
        "the hook fired once for the one rotation: {versions:?}"
    );
    assert!(versions[0].starts_with("db "));
    let revoke = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "revoke")
        .expect("the superseded lease's revocation is audited");
    assert_eq!(revoke["reason"], "superseded after the overlap");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_broker_resumes_the_stream_without_a_new_user() {
    let (pg, mut env) = db_env(&db_policy("1m", "0.7", "10s"), "60s", "120s").await;
    let out = env.tmpfs_out();
    let run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let first = login(out.path());

    env.restart_broker().await;
    wait_for(
        Duration::from_secs(30),
        "the sidecar to reconnect and resume",
        || run.output().contains("files kept").then_some(()),
    )
    .await;
    assert_eq!(login(out.path()), first);
    assert_eq!(
        pg.vault_roles(),
        1,
        "no second user after the broker restart"
    );
    assert!(
        pg.can_login(&first.0, &first.1),
        "restarting the broker revoked nothing"
    );
}

/// Verifies a delivered certificate: chain to `ca`, valid now for `names`, and
/// the private key matches it. Returns the certificate's DER.
fn verify_certificate(out: &std::path::Path, ca_pem: &str, names: &[&str]) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
    let cert = CertificateDer::from_pem_slice(field(out, "tls", "certificate").unwrap().as_bytes())
        .unwrap();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(field(out, "tls", "chain").unwrap().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
    let end_entity = webpki::EndEntityCert::try_from(&cert).unwrap();
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &chain,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("the chain verifies against the CA");
    for name in names {
        end_entity
            .verify_is_valid_for_subject_name(&ServerName::try_from(*name).unwrap())
            .unwrap_or_else(|e| panic!("the certificate is not valid for {name}: {e:?}"));
    }
    let key = PrivateKeyDer::from_pem_slice(field(out, "tls", "private_key").unwrap().as_bytes())
        .unwrap();
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
    rustls::sign::CertifiedKey::new(vec![cert.clone()], signing_key)
        .keys_match()
        .expect("the private key matches the certificate");
    cert.to_vec()
}

/// Whether the certificate `der` still verifies against `ca_pem` now.
fn valid_now(der: &[u8], ca_pem: &str) -> bool {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
    let cert = CertificateDer::from(der.to_vec());
    webpki::EndEntityCert::try_from(&cert)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn pki_certificates_name_the_pod_verify_and_renew_before_expiry() {
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { pki: 1s }
bindings:
  - name: tls
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source:
      pki:
        mount: pki
        role: pods
        commonName: \"{{ pod }}.{{ namespace }}.pod.cluster.local\"
        altNames: [\"{{ serviceAccount }}.{{ namespace }}.svc\"]
    ttl: 8s
    renewFraction: 0.5
    overlap: 2s
";
    let env = Env::start(policy).await;
    let ca = env.bao.pki_role("1h");
    let out = env.tmpfs_out();
    let metrics = format!("127.0.0.1:{}", tessera_tests::free_port());
    let _run = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["tls"],
        &["--metrics-listen", &metrics],
    );
    wait_for(Duration::from_secs(20), "a certificate", || {
        field(out.path(), "tls", "certificate")
    })
    .await;
    let names = ["orders-0.shop.pod.cluster.local", "orders.shop.svc"];
    let first = verify_certificate(out.path(), &ca, &names);

    // The sidecar's metrics say how long the certificate on disk has left.
    let (status, body) = http_get(&format!("http://{metrics}/metrics")).await;
    assert_eq!(status, 200);
    let left: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("tessera_sidecar_seconds_until_expiry "))
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{body}"))
        .parse()
        .unwrap();
    assert!(left > 0.0 && left <= 9.0, "8s certificate: {left}s left");
    assert!(body.contains(r#"tessera_sidecar_credential_stale{binding="tls"} 0"#));

    let renewed = wait_for(Duration::from_secs(30), "the renewed certificate", || {
        field(out.path(), "tls", "certificate").filter(|pem| {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            CertificateDer::from_pem_slice(pem.as_bytes()).is_ok_and(|der| der.to_vec() != first)
        })
    })
    .await;
    assert!(!renewed.is_empty());
    assert!(
        valid_now(&first, &ca),
        "the new certificate arrived before the old one expired"
    );
    verify_certificate(out.path(), &ca, &names);
    let rotate = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "rotate")
        .expect("the renewal is audited");
    assert!(
        rotate["ttl_seconds"].as_u64().is_some_and(|t| t > 0),
        "{rotate}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_may_ask_for_a_shorter_ttl_and_a_policy_reload_does_not_end_its_stream() {
    use tessera_proto::v1::{FetchRequest, WatchRequest};
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: tls
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source:
      pki: { mount: pki, role: pods, commonName: \"{{ pod }}.{{ namespace }}.pod\" }
    ttl: 1h
";
    let env = Env::start(policy).await;
    env.bao.pki_role("2h");
    let token = env.token("shop", "orders");
    let lifetime = |credential: &tessera_proto::v1::Credential| {
        let not_after = credential.not_after.unwrap().seconds;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        not_after - now
    };
    // Fetches `tls` asking for `max` (binding, seconds).
    let fetch = |max: &[(&str, u32)]| {
        let request = FetchRequest {
            bindings: vec!["tls".to_owned()],
            max_ttl_seconds: max.iter().map(|(b, s)| ((*b).to_owned(), *s)).collect(),
            ..Default::default()
        };
        let env = &env;
        let token = token.clone();
        async move { env.client().await.fetch(with_token(&token, request)).await }
    };
    let policy_ttl = fetch(&[]).await.unwrap().into_inner().credentials[0].clone();
    assert!(lifetime(&policy_ttl) > 3000, "{}", lifetime(&policy_ttl));
    let shorter = fetch(&[("tls", 600)])
        .await
        .unwrap()
        .into_inner()
        .credentials[0]
        .clone();
    let left = lifetime(&shorter);
    assert!((560..=605).contains(&left), "asked for 600 s, got {left} s");
    // Asking for more than the policy gives the policy's.
    let longer = fetch(&[("tls", 7200)])
        .await
        .unwrap()
        .into_inner()
        .credentials[0]
        .clone();
    assert!(lifetime(&longer) <= 3600, "{}", lifetime(&longer));
    // A binding the request does not ask for is an invalid request.
    let invalid = fetch(&[("db", 60)]).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("does not ask for"),
        "{}",
        invalid.message()
    );

    // The sidecar asks for it with --max-ttl (what the webhook sets from
    // tessera.dev/ttl.<binding>).
    let out = env.tmpfs_out();
    let written = env.sidecar_once(
        &env.token_file("shop", "orders"),
        out.path(),
        &["tls"],
        &["--max-ttl", "tls=600s"],
    );
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(
        &fs::read(out.path().join(tessera_sidecar::status::STATUS_FILE)).unwrap(),
    )
    .unwrap();
    let not_after =
        humantime::parse_rfc3339(status["bindings"]["tls"]["not_after"].as_str().unwrap()).unwrap();
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(
        (560..=605).contains(&left),
        "the sidecar's certificate lives {left} s"
    );

    // A new policy generation that changes nothing for this pod leaves its
    // narrowed stream open (it is not read as a changed binding).
    let mut stream = env
        .client()
        .await
        .watch(with_token(
            &token,
            WatchRequest {
                bindings: vec!["tls".to_owned()],
                max_ttl_seconds: [("tls".to_owned(), 600)].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().credential.unwrap();
    assert!(lifetime(&first) <= 605);
    env.set_policy(&format!("{policy}# reviewed\n"));
    let next = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(next.is_err(), "the stream ended or sent: {next:?}");
}
