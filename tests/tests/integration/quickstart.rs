//! docs/quickstart.md followed as written against a real kube-apiserver
//! (`scripts/cluster`), as far as it goes without a container runtime: the
//! commands marked "needs running images" are the ones skipped.

use std::process::Command;

use tessera_tests::{
    Cluster, binary, doc_commands::commands, kubernetes::kubectl_binary, workspace_root,
};

#[test]
fn the_quickstart_runs_against_a_real_api_server() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/quickstart.md")).unwrap();
    let cluster = Cluster::start();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::os::unix::fs::symlink(workspace_root().join("deploy"), dir.join("deploy")).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(kubectl_binary(), bin.join("kubectl")).unwrap();
    std::os::unix::fs::symlink(binary("tessera-broker"), bin.join("tessera-broker")).unwrap();
    let helm = std::env::var_os("TESSERA_HELM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/bin/helm"));
    std::os::unix::fs::symlink(helm, bin.join("helm")).unwrap();

    let commands = commands(&doc);
    let mut ran = 0;
    for command in &commands {
        if command.contains("needs running images") {
            continue;
        }
        let output = Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(dir)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{command}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        ran += 1;
        // Right after the workload is applied: the API server stored the
        // Deployment, and its pods are refused while no broker runs (fail
        // closed), as the document says.
        if command.starts_with("kubectl apply -f orders.yaml") {
            assert!(cluster.get(Some("shop"), "deployment/orders").is_some());
        }
    }
    assert!(ran >= 10, "{ran} commands run");
    assert!(
        cluster.get(None, "namespace/shop").is_none()
            || cluster.get(None, "namespace/shop").unwrap()["status"]["phase"] == "Terminating",
        "cleaned up"
    );
}
