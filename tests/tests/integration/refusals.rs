//! Every refusal is audited, once: each kind of error the broker's service
//! returns, through each RPC where it can happen, against a real broker and
//! OpenBao, leaves exactly one audit line saying it was denied (the caller's
//! to fix) or an error (the broker's or Vault's), with the reason. A new
//! path that forgot to audit would fail here.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};
use tessera_broker::dev::TokenSpec;
use tessera_proto::v1::{
    FetchRequest, Held, RevokeRequest, WatchRequest, WhoAmIRequest, broker_client::BrokerClient,
};
use tessera_tests::{Env, wait_for, with_token};
use tonic::{Code, Request, transport::Channel};

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { pki: 1m }
bindings:
  - name: app
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/orders } }
  - name: templated
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/orders } }
    output:
      templates: { dsn: \"postgres://{{ user }}@db\" }
  - name: missing
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/absent } }
  - name: other
    subjects: [{ namespace: shop, serviceAccount: billing }]
    source: { kv2: { mount: secret, path: shop/billing } }
  - name: tls
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source:
      pki: { mount: pki, role: pods, commonName: \"{{ pod }}.shop\" }
    ttl: 10m
";

/// One request of one RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    WhoAmI,
    Fetch,
    Watch,
    Revoke,
}

/// What a request carries besides the RPC.
#[derive(Clone, Default)]
struct Ask {
    token: Option<String>,
    bindings: Vec<&'static str>,
    held: Vec<Held>,
    max_ttl: BTreeMap<String, u32>,
}

impl Ask {
    fn by(token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..Self::default()
        }
    }

    fn bindings(mut self, bindings: &[&'static str]) -> Self {
        self.bindings = bindings.to_vec();
        self
    }

    fn held(mut self, binding: &str, handle: &str) -> Self {
        self.held.push(Held {
            binding: binding.to_owned(),
            handle: handle.to_owned(),
        });
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        match &self.token {
            Some(token) => with_token(token, message),
            None => Request::new(message),
        }
    }
}

/// Calls `rpc`; the status when the broker refused, `None` when it served.
async fn call(client: &mut BrokerClient<Channel>, rpc: Rpc, ask: &Ask) -> Option<tonic::Status> {
    let bindings: Vec<String> = ask.bindings.iter().map(|b| (*b).to_owned()).collect();
    let result = match rpc {
        Rpc::WhoAmI => client
            .who_am_i(ask.request(WhoAmIRequest {}))
            .await
            .map(drop),
        Rpc::Fetch => client
            .fetch(ask.request(FetchRequest {
                bindings,
                held: ask.held.clone(),
                max_ttl_seconds: ask.max_ttl.clone(),
                public_keys: Default::default(),
            }))
            .await
            .map(drop),
        Rpc::Watch => client
            .watch(ask.request(WatchRequest {
                bindings,
                held: ask.held.clone(),
                max_ttl_seconds: ask.max_ttl.clone(),
            }))
            .await
            .map(drop),
        Rpc::Revoke => client
            .revoke(ask.request(RevokeRequest {
                bindings,
                held: ask.held.clone(),
            }))
            .await
            .map(drop),
    };
    result.err()
}

/// Checks that the refusal `what` of `rpc` left exactly one audit line (in
/// `audit`, which read `before` lines before the call), with `outcome`.
async fn one_line(
    audit: impl Fn() -> Vec<Value>,
    before: usize,
    (rpc, what, outcome): (Rpc, &str, &str),
) {
    let new = wait_for(Duration::from_secs(5), "the refusal's audit line", || {
        let lines = audit();
        (lines.len() > before).then_some(lines)
    })
    .await;
    // Anything written late would show now.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let new: Vec<Value> = audit().split_off(before.min(new.len()));
    let refusals: Vec<&Value> = new.iter().filter(|e| e["outcome"] != "success").collect();
    assert_eq!(
        refusals.len(),
        1,
        "{rpc:?}, {what}: one refusal line, got {new:#?}"
    );
    assert_eq!(refusals[0]["outcome"], outcome, "{rpc:?}, {what}: {new:#?}");
    assert!(
        refusals[0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{rpc:?}, {what}: the line gives the reason: {new:#?}"
    );
}

/// Runs `rpc` with `ask`, expecting `code` and one audit line with `outcome`.
async fn refused(
    env: &Env,
    client: &mut BrokerClient<Channel>,
    (rpc, what): (Rpc, &str),
    ask: &Ask,
    (code, outcome): (Code, &str),
) {
    let before = env.audit_events().len();
    let status = call(client, rpc, ask)
        .await
        .unwrap_or_else(|| panic!("{rpc:?}, {what}: served, not refused"));
    assert_eq!(status.code(), code, "{rpc:?}, {what}: {status:?}");
    one_line(|| env.audit_events(), before, (rpc, what, outcome)).await;
}

fn token_for_pod(env: &Env, service_account: &str, pod: Option<&str>) -> String {
    env.signer.mint(&TokenSpec {
        pod: pod.map(str::to_owned),
        ..TokenSpec::new("shop", service_account)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_refusal_through_every_rpc_leaves_one_audit_line() {
    let env = Env::start(POLICY).await;
    env.bao.pki_role("1h");
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    let mut client = env.client().await;
    let orders = env.token("shop", "orders");
    let all = [Rpc::WhoAmI, Rpc::Fetch, Rpc::Watch, Rpc::Revoke];
    let granted = [Rpc::Fetch, Rpc::Watch];

    // A handle of pod orders-0, to present as another pod. (A handle that
    // does not open is no refusal in Fetch and Watch: the broker issues
    // anew, as after a key rotation; Revoke refuses it.)
    let issued = env.fetch(&orders, &["tls"]).await.unwrap();
    let handle = issued.credentials[0].handle.clone();
    let sibling = token_for_pod(&env, "orders", Some("orders-1"));

    for rpc in all {
        let ask = Ask::default().bindings(&["app"]);
        refused(
            &env,
            &mut client,
            (rpc, "no token"),
            &ask,
            (Code::Unauthenticated, "denied"),
        )
        .await;
        let ask = Ask::by("not.a.jwt").bindings(&["app"]);
        refused(
            &env,
            &mut client,
            (rpc, "a malformed token"),
            &ask,
            (Code::Unauthenticated, "denied"),
        )
        .await;
    }
    for rpc in granted {
        let cases: [(&str, Ask, Code, &str); 7] = [
            (
                "a binding not granted",
                Ask::by(&orders).bindings(&["other"]),
                Code::PermissionDenied,
                "denied",
            ),
            (
                "a binding named twice",
                Ask::by(&orders).bindings(&["app", "app"]),
                Code::InvalidArgument,
                "denied",
            ),
            (
                "a TTL below the floor",
                Ask {
                    max_ttl: BTreeMap::from([("tls".to_owned(), 1)]),
                    ..Ask::by(&orders).bindings(&["tls"])
                },
                Code::InvalidArgument,
                "denied",
            ),
            (
                "a token bound to no pod",
                Ask::by(&token_for_pod(&env, "orders", None)).bindings(&["tls"]),
                Code::PermissionDenied,
                "denied",
            ),
            (
                "another pod's handle",
                Ask::by(&sibling).bindings(&["tls"]).held("tls", &handle),
                Code::PermissionDenied,
                "denied",
            ),
            (
                "a template the secret cannot fill",
                Ask::by(&orders).bindings(&["templated"]),
                Code::FailedPrecondition,
                "error",
            ),
            (
                "a secret Vault does not have",
                Ask::by(&orders).bindings(&["missing"]),
                Code::FailedPrecondition,
                "error",
            ),
        ];
        for (what, ask, code, outcome) in cases {
            refused(&env, &mut client, (rpc, what), &ask, (code, outcome)).await;
        }
    }
    let revokes: [(&str, Ask, Code); 3] = [
        (
            "a binding not in the policy",
            Ask::by(&orders).held("nope", &handle),
            Code::InvalidArgument,
        ),
        (
            "a forged handle",
            Ask::by(&orders).held("tls", "forged"),
            Code::InvalidArgument,
        ),
        (
            "another pod's handle",
            Ask::by(&sibling).held("tls", &handle),
            Code::PermissionDenied,
        ),
    ];
    for (what, ask, code) in revokes {
        refused(
            &env,
            &mut client,
            (Rpc::Revoke, what),
            &ask,
            (code, "denied"),
        )
        .await;
    }

    // Watch only: a fifth stream of one pod on one leased binding.
    let pod = token_for_pod(&env, "orders", Some("orders-streams"));
    let mut open = Vec::new();
    for _ in 0..4 {
        let ask = Ask::by(&pod).bindings(&["tls"]);
        open.push(
            client
                .watch(ask.request(WatchRequest {
                    bindings: vec!["tls".to_owned()],
                    ..Default::default()
                }))
                .await
                .expect("four streams are allowed"),
        );
    }
    let ask = Ask::by(&pod).bindings(&["tls"]);
    refused(
        &env,
        &mut client,
        (Rpc::Watch, "a fifth stream"),
        &ask,
        (Code::ResourceExhausted, "denied"),
    )
    .await;
    drop(open);

    // The lease records out of reach: issuing cannot be recorded.
    env.bao.cli(&["secrets", "disable", "tessera-leases"]);
    for rpc in granted {
        let pod = token_for_pod(&env, "orders", Some(&format!("orders-{rpc:?}")));
        let ask = Ask::by(&pod).bindings(&["tls"]);
        refused(
            &env,
            &mut client,
            (rpc, "lease records unwritable"),
            &ask,
            (Code::FailedPrecondition, "error"),
        )
        .await;
    }

    // Rate limits, on a replica that allows one request at a time.
    let replica = env
        .start_replica_with("limited", |config| {
            config.rate_limit.per_second = 1;
            config.rate_limit.burst = 1;
        })
        .await;
    let mut limited = BrokerClient::new(env.channel_to(&replica.uri).await);
    for rpc in all {
        let pod = token_for_pod(&env, "orders", Some(&format!("limited-{rpc:?}")));
        let ask = Ask::by(&pod).bindings(&["app"]);
        let _ = call(&mut limited, rpc, &ask).await;
        let before = replica.audit_events().len();
        let status = call(&mut limited, rpc, &ask)
            .await
            .expect("the second is refused");
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{rpc:?}: {status:?}"
        );
        one_line(
            || replica.audit_events(),
            before,
            (rpc, "rate limited", "denied"),
        )
        .await;
    }
}
