//! docs/install.md's shell commands, run as written: `vault` (OpenBao's CLI
//! under Vault's name), `helm` and `kubectl` against a real OpenBao, a real
//! kube-apiserver (`scripts/cluster`) and a private PostgreSQL. Only what
//! names the reader's own cluster is substituted (the issuer URL, the
//! database host and its password). Each way of giving Vault the cluster's
//! keys is proven by logging in with the chart's service-account token.

use std::process::Command;

use tessera_tests::{
    Cluster, OpenBao, Postgres, bao_binary, doc_commands::commands, kubernetes::kubectl_binary,
    simple_policy, workspace_root,
};

/// The `hcl` block: the broker's Vault policy.
fn hcl(doc: &str) -> String {
    let start = doc.find("```hcl\n").expect("the policy block") + "```hcl\n".len();
    doc[start..start + doc[start..].find("```").unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_in_install_md_runs_as_documented() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/install.md")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bao = OpenBao::start(dir).await;
    // The harness prepares lease records; the document enables them itself.
    bao.cli(&["secrets", "disable", "tessera-leases"]);
    let cluster = Cluster::start();
    let pg = Postgres::start();
    cluster.service_account("shop", "orders");

    // What the reader has at hand: the policy files, the cluster's CA and
    // the signing key's public half (kubeadm's sa.pub).
    std::fs::write(dir.join("tessera-broker.hcl"), hcl(&doc)).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        simple_policy("app", "shop", "orders", "shop/app"),
    )
    .unwrap();
    std::fs::copy(cluster.ca_file(), dir.join("cluster-ca.crt")).unwrap();
    std::fs::copy(cluster.dir().join("pki/sa.pub"), dir.join("sa.pub")).unwrap();
    std::os::unix::fs::symlink(workspace_root().join("deploy"), dir.join("deploy")).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(bao_binary(), bin.join("vault")).unwrap();
    std::os::unix::fs::symlink(kubectl_binary(), bin.join("kubectl")).unwrap();
    let helm = std::env::var_os("TESSERA_HELM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/bin/helm"));
    std::os::unix::fs::symlink(helm, bin.join("helm")).unwrap();

    let api = cluster.server.trim_start_matches("https://").to_owned();
    let substitute = |command: &str| {
        command
            .replace(
                "https://kubernetes.default.svc.cluster.local",
                &cluster.server,
            )
            .replace("API-SERVER:6443", &api)
            .replace(
                "@db.shop.svc:5432/orders",
                &format!("@127.0.0.1:{}/postgres", pg.port),
            )
            .replace(
                "username=vault password=...",
                &format!("username=postgres password={}", pg.password),
            )
    };
    let run = |command: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(dir)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("VAULT_ADDR", &bao.address)
            .env("VAULT_TOKEN", &bao.root_token)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .output()
            .unwrap()
    };

    let commands = commands(&doc);
    assert!(commands.len() >= 15, "{commands:#?}");
    let mut configs = Vec::new();
    for command in &commands {
        if command.contains("not run by the tests") {
            continue;
        }
        let command = substitute(command);
        let output = run(&command);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // A dev server already serves KV v2 at secret/, as the doc says.
        let documented =
            command.contains("-path=secret kv") && stderr.contains("path is already in use");
        assert!(output.status.success() || documented, "{command}\n{stderr}");
        if command.contains("auth/jwt/config") {
            configs.push(command);
        }
    }
    assert_eq!(
        configs.len(),
        3,
        "discovery, JWKS URL, public key: {configs:#?}"
    );

    // The sizing section's HorizontalPodAutoscaler is one the API server
    // takes (Argo CD's Application needs Argo CD's CRDs, which are not here).
    let start = doc
        .find("kind: HorizontalPodAutoscaler")
        .expect("the HPA example");
    let block_start = doc[..start].rfind("```yaml\n").unwrap() + "```yaml\n".len();
    let hpa = &doc[block_start..start + doc[start..].find("```").unwrap()];
    let applied = cluster.with_stdin(&["apply", "--dry-run=server", "-f", "-"], hpa);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // Each way of giving Vault the keys lets the broker log in (its
    // service account, whatever the document did with the release since).
    cluster.service_account("tessera", "tessera");
    let token = cluster.token("tessera", "tessera", "vault", None, 600);
    for config in &configs {
        let output = run(config);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let login = run(&format!(
            "vault write -field=token auth/jwt/login role=tessera-broker jwt={token}"
        ));
        assert!(
            login.status.success(),
            "login after `{config}`: {}",
            String::from_utf8_lossy(&login.stderr)
        );
    }
}
