//! Keys made in the pod: the sidecar makes an Ed25519 key and has Vault's
//! SSH engine sign it (a real `sshd` trusting the engine's CA lets the
//! certificate in, and no longer once it expired), and an ECDSA key with a
//! certificate request for Vault's PKI `sign` (`key: pod`), whose private key
//! is found nowhere in the broker: not in its memory, logs or audit trail.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tessera_proto::v1::{FetchRequest, KeyKind};
use tessera_tests::{Env, Sshd, field, memory_occurrences, random_string, wait_for, with_token};

const SSH_POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits: { minTtl: { ssh: 1s } }
bindings:
  - name: shell
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source:
      ssh:
        mount: ssh
        role: pods
        principals: [\"{{ serviceAccount }}\"]
        extensions: { permit-pty: \"\" }
    ttl: 12s
    renewFraction: 0.5
";

/// Enables the SSH engine with an Ed25519 user CA and role `pods`; returns
/// the CA's public key line.
fn ssh_engine(env: &Env) -> String {
    env.bao.cli(&["secrets", "enable", "ssh"]);
    env.bao.cli(&[
        "write",
        "ssh/config/ca",
        "generate_signing_key=true",
        "key_type=ed25519",
    ]);
    env.bao.cli(&[
        "write",
        "ssh/roles/pods",
        "key_type=ca",
        "allow_user_certificates=true",
        "allowed_users=*",
        "allowed_extensions=permit-pty",
        "ttl=1m",
        "max_ttl=1h",
    ]);
    env.bao.cli(&["read", "-field=public_key", "ssh/config/ca"])
}

/// A copy of the key and certificate in `out`, both of one version (read
/// through the version `..data` names, which a renewal never changes),
/// kept after the sidecar replaces them.
fn keep(out: &Path) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let version = fs::canonicalize(out.join("shell/..data")).unwrap();
    let into = tempfile::tempdir().unwrap();
    let key = into.path().join("id_ed25519");
    let cert = into.path().join("id_ed25519-cert.pub");
    fs::copy(version.join("id_ed25519"), &key).unwrap();
    fs::copy(version.join("id_ed25519-cert.pub"), &cert).unwrap();
    (into, key, cert)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ssh_key_made_in_the_pod_logs_in_with_its_certificate_renews_with_a_fresh_key_and_fails_once_expired()
 {
    let env = Env::start(SSH_POLICY).await;
    let sshd = Sshd::start(&ssh_engine(&env), &["orders"]);
    let out = env.tmpfs_out();
    let run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["shell"]);
    let first_cert = wait_for(Duration::from_secs(20), "the certificate", || {
        field(out.path(), "shell", "id_ed25519-cert.pub")
    })
    .await;
    assert!(
        first_cert.starts_with("ssh-ed25519-cert-v01@openssh.com "),
        "{first_cert}"
    );
    let mode = fs::metadata(out.path().join("shell/id_ed25519"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400, "the private key is the owner's alone");
    let (_first, old_key, old_cert) = keep(out.path());
    assert!(
        sshd.can_login(&old_key, &old_cert),
        "the delivered certificate logs in to sshd"
    );

    // At half its 12 s the sidecar sends a fresh key for a successor.
    wait_for(
        Duration::from_secs(30),
        "a certificate for a fresh key",
        || field(out.path(), "shell", "id_ed25519-cert.pub").filter(|c| *c != first_cert),
    )
    .await;
    let (_second, new_key, new_cert) = keep(out.path());
    assert_ne!(
        fs::read(&new_key).unwrap(),
        fs::read(&old_key).unwrap(),
        "each certificate is for a new key"
    );
    assert!(sshd.can_login(&new_key, &new_cert), "the successor logs in");

    // The first certificate ends 12 s after it was signed.
    wait_for(
        Duration::from_secs(30),
        "the first certificate to expire",
        || (!sshd.can_login(&old_key, &old_cert)).then_some(()),
    )
    .await;
    drop(run);

    let issued: Vec<_> = env
        .audit_events()
        .into_iter()
        .filter(|e| e["action"] == "issue" && e["binding"] == "shell")
        .collect();
    assert!(issued.len() >= 2, "every signing is audited: {issued:?}");
    assert_eq!(
        issued[0]["source"],
        "ssh ssh/sign/pods principals [{{ serviceAccount }}] extensions [permit-pty]"
    );
    let log = fs::read_to_string(&env.broker.log).unwrap();
    let audit = serde_json::Value::from(env.audit_events()).to_string();
    let second_key = fs::read_to_string(&new_key).unwrap();
    for line in second_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !log.contains(line) && !audit.contains(line),
            "the private key is not in the broker's log or audit"
        );
    }
}

/// A policy whose `tls` binding has Vault sign the pod's own key, with a
/// marker name the broker keeps in memory (the scan's control).
fn pki_policy(marker: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits: {{ minTtl: {{ pki: 1s }} }}
bindings:
  - name: tls
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source:
      pki:
        mount: pki
        role: pods
        commonName: \"{{{{ pod }}}}.shop.svc\"
        altNames: [\"{marker}\"]
        key: pod
    ttl: 1h
  - name: kv
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ kv2: {{ mount: secret, path: shop/app }} }}
"
    )
}

/// What `openssl` prints for `args` on the PEM `input`.
fn openssl(args: &[&str], input: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.pem");
    fs::write(&path, input).unwrap();
    let output = Command::new("openssl")
        .args(args)
        .arg("-in")
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_a_key_made_in_the_pod_matches_it_and_the_key_never_reaches_the_broker() {
    let marker = format!("marker-{}.example", random_string(12).to_lowercase());
    let env = Env::start(&pki_policy(&marker)).await;
    env.bao.pki_role("1h");
    // The policy names the certificate, never the pod's request.
    env.bao.cli(&[
        "write",
        "pki/roles/pods",
        "allow_any_name=true",
        "enforce_hostnames=false",
        "use_csr_common_name=false",
        "use_csr_sans=false",
        "key_type=any",
        "max_ttl=1h",
    ]);
    env.bao
        .put("shop/app", &serde_json::json!({ "k": "v" }))
        .await;
    let out = env.tmpfs_out();
    let sidecar = env.sidecar_run(
        &env.token_file("shop", "orders"),
        out.path(),
        &["tls", "kv"],
    );
    let key = wait_for(Duration::from_secs(20), "the key and certificate", || {
        field(out.path(), "tls", "private_key")
    })
    .await;
    let certificate = field(out.path(), "tls", "certificate").unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS #8");
    assert_eq!(
        openssl(&["x509", "-pubkey", "-noout"], &certificate),
        openssl(&["pkey", "-pubout"], &key),
        "the certificate is for the pod's key"
    );
    let subject = openssl(
        &["x509", "-noout", "-subject", "-ext", "subjectAltName"],
        &certificate,
    );
    assert!(
        subject.contains("orders-0.shop.svc") && subject.contains(&marker),
        "named by the policy: {subject}"
    );
    assert_eq!(field(out.path(), "kv", "k").as_deref(), Some("v"));

    // Not in the broker: its memory (read through /proc), log and audit.
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let broker = env.broker.pid();
    let mut needles = body.clone();
    needles.push(&marker);
    let found = memory_occurrences(broker, &needles);
    assert!(
        found[body.len()] > 0,
        "control: the scan finds the policy's marker in the broker"
    );
    assert!(
        found[..body.len()].iter().all(|&n| n == 0),
        "the pod's private key is in the broker's memory: {found:?}"
    );
    let log = fs::read_to_string(&env.broker.log).unwrap();
    let audit = serde_json::Value::from(env.audit_events()).to_string();
    assert!(body.iter().all(|l| !log.contains(l) && !audit.contains(l)));
    drop(sidecar);

    // A request naming another host is refused, naming the fix; a key for
    // a binding whose key Vault makes is refused.
    let token = env.token("shop", "orders");
    let mut client = env.client().await;
    let ask = FetchRequest {
        bindings: vec!["tls".to_owned()],
        ..Default::default()
    };
    let answer = client
        .fetch(with_token(&token, ask.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.credentials[0].key_wanted, i32::from(KeyKind::Pkcs10));
    assert!(answer.credentials[0].fields.is_empty());
    let foreign = openssl_request("/CN=bank.example");
    let mut named = ask.clone();
    named
        .public_keys
        .insert("tls".to_owned(), foreign.into_bytes());
    let refused = client.fetch(with_token(&token, named)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("leave it empty"),
        "{}",
        refused.message()
    );
    let mut wrong = FetchRequest {
        bindings: vec!["kv".to_owned()],
        ..Default::default()
    };
    wrong
        .public_keys
        .insert("kv".to_owned(), b"ssh-ed25519 AAAA".to_vec());
    let refused = client.fetch(with_token(&token, wrong)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("not made by the pod"),
        "{}",
        refused.message()
    );
}

/// A certificate request from `openssl req` for subject `subject`.
fn openssl_request(subject: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", subject, "-keyout"])
        .arg(dir.path().join("key.pem"))
        .output()
        .unwrap();
    assert!(output.status.success(), "openssl req: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}
