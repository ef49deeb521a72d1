use super::*;
use crate::identity::Identity;

const CLUSTER: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: ClusterAccessPolicy
metadata: { name: platform }
spec:
  limits: { maxTtl: 4h }
  bindings:
    - name: shared-db
      subjects: [{ namespace: shop, serviceAccount: api }]
      source: { database: { mount: database, role: shop } }
  delegations:
    - namespaces: ["team-*"]
      kv2: [{ mount: secret, pathPrefix: "teams/{{ namespace }}/" }]
      database: [{ mount: database, role: "{{ namespace }}-*" }]
      maxTtl: 1h
"#;

fn binding(namespace: &str, name: &str, source: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: AccessBinding\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  serviceAccounts: [app]\n  source: {source}\n"
    )
}

fn resource(
    kind: ResourceKind,
    namespace: Option<&str>,
    name: &str,
    created: &str,
    text: String,
) -> ClusterResource {
    ClusterResource {
        key: ResourceKey {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        },
        generation: 1,
        created: created.to_owned(),
        text,
    }
}

fn access(namespace: &str, name: &str, created: &str, source: &str) -> ClusterResource {
    resource(
        ResourceKind::AccessBinding,
        Some(namespace),
        name,
        created,
        binding(namespace, name, source),
    )
}

fn cluster_policy() -> ClusterResource {
    resource(
        ResourceKind::ClusterAccessPolicy,
        None,
        "platform",
        "2026-01-01T00:00:00Z",
        CLUSTER.to_owned(),
    )
}

fn who(namespace: &str, service_account: &str) -> Identity {
    Identity {
        namespace: namespace.into(),
        service_account: service_account.into(),
        service_account_uid: String::new(),
        pod: None,
        node: None,
        pod_labels: None,
        expires_at: 0,
    }
}

#[test]
fn a_delegated_binding_is_granted_to_its_namespaces_service_accounts_only() {
    let (policy, verdicts) = compile_all(
        &[],
        &[
            cluster_policy(),
            access(
                "team-a",
                "cache",
                "2026-01-02T00:00:00Z",
                "{ kv2: { mount: secret, path: teams/team-a/cache } }",
            ),
        ],
    )
    .unwrap();
    assert!(verdicts.iter().all(Verdict::accepted), "{verdicts:?}");
    assert!(policy.lookup(&who("team-a", "app"), "cache").is_some());
    assert!(policy.lookup(&who("team-a", "other"), "cache").is_none());
    assert!(policy.lookup(&who("team-b", "app"), "cache").is_none());
    assert!(policy.lookup(&who("shop", "api"), "shared-db").is_some());
    assert_eq!(
        policy.binding("cache").unwrap().defined_at,
        "AccessBinding team-a/cache"
    );
}

#[test]
fn a_binding_outside_its_delegation_is_rejected_alone_with_the_reason() {
    let (policy, verdicts) = compile_all(
        &[],
        &[
            cluster_policy(),
            access(
                "team-a",
                "theirs",
                "2026-01-02T00:00:00Z",
                "{ kv2: { mount: secret, path: teams/team-b/db } }",
            ),
            access(
                "team-a",
                "role",
                "2026-01-02T00:00:01Z",
                "{ database: { mount: database, role: team-b-ro } }",
            ),
            access(
                "team-a",
                "long",
                "2026-01-02T00:00:02Z",
                "{ database: { mount: database, role: team-a-ro } }\n  ttl: 2h",
            ),
            access(
                "team-a",
                "ssh",
                "2026-01-02T00:00:03Z",
                "{ ssh: { mount: ssh, role: any } }",
            ),
            access(
                "shop",
                "own",
                "2026-01-02T00:00:04Z",
                "{ kv2: { mount: secret, path: shop/x } }",
            ),
            access(
                "team-a",
                "fine",
                "2026-01-02T00:00:05Z",
                "{ database: { mount: database, role: team-a-ro } }",
            ),
        ],
    )
    .unwrap();
    let message = |name: &str| {
        let v = verdicts.iter().find(|v| v.key.name == name).unwrap();
        v.problems.join("; ")
    };
    assert!(message("theirs").contains("kv2 `secret/teams/team-b/db` is not delegated (delegated: kv2 secret paths under `teams/team-a/`"), "{}", message("theirs"));
    assert!(
        message("role").contains("database `database` role `team-b-ro` is not delegated"),
        "{}",
        message("role")
    );
    assert!(
        message("long").contains("ttl 2h is above the delegation's maxTtl 1h"),
        "{}",
        message("long")
    );
    assert!(
        message("ssh").contains("only kv2, database and pki can be delegated"),
        "{}",
        message("ssh")
    );
    assert!(
        message("own").contains("namespace `shop` may not define bindings of its own"),
        "{}",
        message("own")
    );
    assert_eq!(message("fine"), "");
    let names: Vec<_> = policy.bindings.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["shared-db", "fine"]);
}

#[test]
fn files_come_first_then_cluster_policies_then_access_bindings_oldest_first() {
    let file = "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nlimits: { maxTtl: 2h }\nbindings:\n  - name: cache\n    subjects: [{ namespace: shop, serviceAccount: api }]\n    source: { kv2: { mount: secret, path: shop/cache } }\n";
    let (policy, verdicts) = compile_all(
        &[("policy.yaml".to_owned(), file.to_owned())],
        &[
            access(
                "team-a",
                "db",
                "2026-01-03T00:00:00Z",
                "{ database: { mount: database, role: team-a-ro } }",
            ),
            access(
                "team-b",
                "db",
                "2026-01-02T00:00:00Z",
                "{ database: { mount: database, role: team-b-ro } }",
            ),
            access(
                "team-a",
                "cache",
                "2026-01-02T00:00:00Z",
                "{ kv2: { mount: secret, path: teams/team-a/cache } }",
            ),
            cluster_policy(),
        ],
    )
    .unwrap();
    let verdict = |ns: &str, name: &str| {
        verdicts
            .iter()
            .find(|v| v.key.namespace.as_deref() == Some(ns) && v.key.name == name)
            .unwrap()
    };
    // The file set limits: the cluster policy may not set them again.
    let cluster = verdicts
        .iter()
        .find(|v| v.key.kind == ResourceKind::ClusterAccessPolicy)
        .unwrap();
    assert!(
        cluster.problems[0].contains("`limits` is already set in policy.yaml"),
        "{cluster:?}"
    );
    // So nothing is delegated, and every AccessBinding is rejected...
    assert!(!verdict("team-b", "db").accepted());
    // ...but the file's policy is whole.
    assert_eq!(policy.bindings.len(), 1);

    // Without the clash: the older `db` keeps the name, the file keeps `cache`.
    let file = file.replace("limits: { maxTtl: 2h }\n", "");
    let (policy, verdicts) = compile_all(
        &[("policy.yaml".to_owned(), file)],
        &[
            access(
                "team-a",
                "db",
                "2026-01-03T00:00:00Z",
                "{ database: { mount: database, role: team-a-ro } }",
            ),
            access(
                "team-b",
                "db",
                "2026-01-02T00:00:00Z",
                "{ database: { mount: database, role: team-b-ro } }",
            ),
            access(
                "team-a",
                "cache",
                "2026-01-02T00:00:00Z",
                "{ kv2: { mount: secret, path: teams/team-a/cache } }",
            ),
            cluster_policy(),
        ],
    )
    .unwrap();
    let verdict = |ns: &str, name: &str| {
        verdicts
            .iter()
            .find(|v| v.key.namespace.as_deref() == Some(ns) && v.key.name == name)
            .unwrap()
    };
    assert!(verdict("team-b", "db").accepted());
    assert!(verdict("team-a", "db").problems[0].contains(
        "names are unique across the cluster: rename this AccessBinding, e.g. `team-a-db`"
    ));
    assert!(verdict("team-a", "cache").problems[0].contains("binding `cache` is already defined"));
    assert!(policy.lookup(&who("team-b", "app"), "db").is_some());
    assert!(policy.lookup(&who("team-a", "app"), "db").is_none());
}

#[test]
fn resource_files_are_checked_as_a_whole_with_their_locations() {
    let ab = binding(
        "team-a",
        "theirs",
        "{ kv2: { mount: secret, path: teams/team-b/db } }",
    );
    let error = compile_all(
        &[
            ("cluster.yaml".to_owned(), CLUSTER.to_owned()),
            ("theirs.yaml".to_owned(), ab),
        ],
        &[],
    )
    .unwrap_err();
    assert_eq!(error.problems.len(), 1, "{error}");
    let problem = &error.problems[0];
    assert_eq!((problem.file.as_str(), problem.line), ("theirs.yaml", 5));
    assert!(problem.message.contains("is not delegated"), "{problem}");

    // A broken resource read from the cluster rejects only itself.
    let broken = access(
        "team-a",
        "typo",
        "2026-01-02T00:00:00Z",
        "{ kv2: { mount: secret, paht: x } }",
    );
    let (_, verdicts) = compile_all(&[], &[cluster_policy(), broken]).unwrap();
    assert!(verdicts[0].accepted());
    assert!(
        verdicts[1].problems[0].contains("paht"),
        "{:?}",
        verdicts[1]
    );
}

#[test]
fn a_delegated_kv_prefix_must_end_with_a_slash() {
    let text = CLUSTER.replace("\"teams/{{ namespace }}/\"", "\"teams/{{ namespace }}\"");
    let error = compile_all(&[("c.yaml".to_owned(), text)], &[]).unwrap_err();
    assert!(
        error.problems[0].message.contains("must end with `/`"),
        "{error}"
    );
}

#[test]
fn a_rejected_generation_keeps_the_last_accepted_one_in_force_until_deleted() {
    use crate::policy::store::PolicyStore;
    let good = access(
        "team-a",
        "cache",
        "2026-01-02T00:00:00Z",
        "{ kv2: { mount: secret, path: teams/team-a/cache } }",
    );
    let store =
        PolicyStore::load_with(Vec::new(), "test-1", vec![cluster_policy(), good.clone()]).unwrap();
    let served = |store: &PolicyStore| {
        store
            .current()
            .policy
            .lookup(&who("team-a", "app"), "cache")
            .map(|b| b.source.clone())
    };
    let before = served(&store).unwrap();

    let mut bad = access(
        "team-a",
        "cache",
        "2026-01-02T00:00:00Z",
        "{ kv2: { mount: secret, path: teams/team-b/cache } }",
    );
    bad.generation = 2;
    assert!(store.set_resources(vec![cluster_policy(), bad]).unwrap());
    let verdicts = store.verdicts().borrow().clone();
    let verdict = verdicts.iter().find(|v| v.key.name == "cache").unwrap();
    assert_eq!((verdict.generation, verdict.in_force), (2, Some(1)));
    assert!(verdict.problems[0].contains("is not delegated"));
    assert_eq!(served(&store), Some(before), "generation 1 stays served");

    assert!(store.set_resources(vec![cluster_policy()]).unwrap());
    assert_eq!(served(&store), None, "deleted: withdrawn");
    assert!(store.set_resources(vec![cluster_policy(), good]).unwrap());
    assert!(served(&store).is_some());
}

#[test]
fn what_a_cluster_resource_defines_is_located_by_its_name() {
    let (policy, verdicts) = compile_all(
        &[],
        &[
            cluster_policy(),
            access(
                "team-a",
                "x",
                "2026-01-02T00:00:00Z",
                "{ kv2: { mount: secret, path: teams/team-b/x } }",
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        policy.binding("shared-db").unwrap().defined_at,
        "ClusterAccessPolicy platform"
    );
    assert_eq!(
        policy.delegations[0].defined_at,
        "ClusterAccessPolicy platform"
    );
    assert!(
        verdicts[1].problems[0].contains("(ClusterAccessPolicy platform)"),
        "{:?}",
        verdicts[1]
    );
}
