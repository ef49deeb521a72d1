//! The broker's life as one piece: a server that fails takes the broker down
//! with an error naming it (Kubernetes then restarts the pod), instead of the
//! replica running on without a part. Faults are injected into the real
//! process: its listening socket is shut down under it.

use std::time::Duration;

use tessera_tests::{Env, simple_policy, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_server_whose_listening_socket_breaks_stops_the_broker_naming_it() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    for (index, server) in ["gRPC server", "admin server", "webhook server"]
        .into_iter()
        .enumerate()
    {
        let mut replica = env.start_replica(&format!("fault-{index}")).await;
        let port = replica
            .servers()
            .into_iter()
            .find_map(|(name, port)| (name == server).then_some(port))
            .unwrap();
        replica.proc.break_listener(port);
        let code = wait_for(Duration::from_secs(30), "the broker to stop", || {
            replica.proc.exited().then(|| replica.proc.exit_code())
        })
        .await;
        let output = replica.proc.output();
        assert_eq!(code, Some(1), "{server}: exit status\n{output}");
        assert!(
            output.contains(&format!("{server} failed: the listening socket is gone")),
            "{server}: the error names the server\n{output}"
        );
        assert!(
            !output.contains("panicked"),
            "{server}: a failure, not a panic\n{output}"
        );
    }
}
