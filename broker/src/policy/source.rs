//! Where a binding's values come from: the kinds of source a policy names,
//! the fields each delivers, and how each is shown.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Where a binding's values come from; a new kind is a new variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Vault KV version 2 secret.
    Kv2(Kv2Source),
    /// Dynamic credentials from Vault's database engine (a lease).
    Database(DatabaseSource),
    /// A certificate from Vault's PKI engine.
    Pki(PkiSource),
    /// An SSH certificate from Vault's SSH engine for a key the pod makes.
    Ssh(SshSource),
    /// Any Vault path, read or written: what Vault answers decides the
    /// credential's life (a renewable lease is renewed and rotated, one that
    /// is not is read again before it ends, no lease is a static secret).
    Vault(VaultPathSource),
}

/// A Vault path the broker reads (`GET`) or writes (`PUT` with `data`):
/// AWS, GCP, Azure, Consul, Nomad, RabbitMQ or TOTP credentials, without a
/// kind of their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultPathSource {
    /// The path below `/v1/`, e.g. `aws/creds/deploy`.
    pub path: String,
    /// Whether the path is written (with `data`) rather than read.
    pub write: bool,
    /// What a write sends.
    pub data: BTreeMap<String, String>,
    /// The answer's fields to deliver; every field when absent.
    pub fields: Option<Vec<String>>,
    /// The Vault namespace (full path, e.g. `team-a`) it lives in; the
    /// broker's own when absent.
    pub namespace: Option<String>,
}

/// Dynamic database credentials: `mount/creds/role`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseSource {
    /// Mount path of the database engine, e.g. `database`.
    pub mount: String,
    /// The database engine's role, which holds the SQL that makes a user.
    pub role: String,
    /// The Vault namespace (full path, e.g. `team-a`) it lives in; the
    /// broker's own when absent.
    pub namespace: Option<String>,
}

/// A certificate from `mount/issue/role` for names rendered from the caller's
/// identity (`{{ pod }}`, `{{ namespace }}`, `{{ serviceAccount }}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiSource {
    /// Mount path of the PKI engine, e.g. `pki`.
    pub mount: String,
    /// The PKI engine's role, which bounds names and lifetimes.
    pub role: String,
    /// The certificate's common name: a template of `pod`, `namespace`, `serviceAccount`.
    pub common_name: String,
    /// Subject alternative name templates.
    pub alt_names: Vec<String>,
    /// Who makes the private key: Vault (`mount/issue/role`) or the pod
    /// (`mount/sign/role` for the pod's certificate request).
    pub key: KeyMaker,
    /// The Vault namespace (full path, e.g. `team-a`) it lives in; the
    /// broker's own when absent.
    pub namespace: Option<String>,
}

/// Who makes a certificate's private key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyMaker {
    /// Vault makes it and it passes through the broker (`pki/issue`).
    #[default]
    Vault,
    /// The pod makes it and keeps it; only its public part travels.
    Pod,
}

/// An SSH user certificate from `mount/sign/role` for an Ed25519 key the
/// pod makes and keeps, for principals rendered from its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshSource {
    /// Mount path of the SSH engine, e.g. `ssh`.
    pub mount: String,
    /// The SSH engine's role, which bounds principals, extensions and TTL.
    pub role: String,
    /// Principal templates (`{{ serviceAccount }}`, …); the role's
    /// default when empty.
    pub principals: Vec<String>,
    /// Certificate extensions, e.g. `permit-pty: ""`; the role's default
    /// when empty.
    pub extensions: BTreeMap<String, String>,
    /// The Vault namespace (full path, e.g. `team-a`) it lives in; the
    /// broker's own when absent.
    pub namespace: Option<String>,
}

/// A key the pod makes and keeps for a binding: Vault signs its public part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodKey {
    /// An Ed25519 key, for an SSH certificate.
    SshEd25519,
    /// A key with a PKCS #10 certificate request, for an X.509 certificate.
    Pkcs10,
}

impl PodKey {
    /// The field (file) the pod writes its private key to.
    pub fn field(self) -> &'static str {
        match self {
            PodKey::SshEd25519 => SSH_KEY_FIELD,
            PodKey::Pkcs10 => "private_key",
        }
    }
}

impl VaultPathSource {
    /// The mount: the path's first segment.
    pub fn mount(&self) -> &str {
        self.path.split('/').next().unwrap_or_default()
    }
}

/// Whether `text` is a Vault namespace path (`team-a`, `org/team-a`): names
/// of letters, digits, `-` and `_` between single slashes. Anything else
/// could not travel in the `X-Vault-Namespace` header, and a request must
/// never fall back to another namespace for it.
pub fn is_namespace_path(text: &str) -> bool {
    !text.is_empty()
        && text.split('/').all(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Fields a database source delivers.
pub const DATABASE_FIELDS: &[&str] = &["username", "password"];
/// Fields a PKI source delivers.
pub const PKI_FIELDS: &[&str] = &["certificate", "private_key", "ca", "chain"];
/// Fields an SSH source delivers: the pod's key and Vault's certificate.
pub const SSH_FIELDS: &[&str] = &[SSH_KEY_FIELD, "id_ed25519-cert.pub"];
/// The field of the pod's own SSH key.
const SSH_KEY_FIELD: &str = "id_ed25519";
/// Identity values PKI name templates may use.
pub const PKI_NAME_FIELDS: &[&str] = &["pod", "namespace", "serviceAccount"];

impl Source {
    /// The kind's name as written in the policy.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Kv2(_) => "kv2",
            Source::Database(_) => "database",
            Source::Pki(_) => "pki",
            Source::Ssh(_) => "ssh",
            Source::Vault(_) => "vault",
        }
    }

    /// The Vault mount it reads from.
    pub fn mount(&self) -> &str {
        match self {
            Source::Kv2(kv) => &kv.mount,
            Source::Database(db) => &db.mount,
            Source::Pki(pki) => &pki.mount,
            Source::Ssh(ssh) => &ssh.mount,
            Source::Vault(path) => path.mount(),
        }
    }

    /// The Vault namespace it lives in; `None` for the broker's own.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Source::Kv2(kv) => kv.namespace.as_deref(),
            Source::Database(db) => db.namespace.as_deref(),
            Source::Pki(pki) => pki.namespace.as_deref(),
            Source::Ssh(ssh) => ssh.namespace.as_deref(),
            Source::Vault(path) => path.namespace.as_deref(),
        }
    }

    /// The fields it delivers, when known before reading it.
    pub fn known_fields(&self) -> Option<Vec<String>> {
        let owned = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        match self {
            Source::Kv2(kv) => kv.keys.clone(),
            Source::Database(_) => Some(owned(DATABASE_FIELDS)),
            Source::Pki(_) => Some(owned(PKI_FIELDS)),
            Source::Ssh(_) => Some(owned(SSH_FIELDS)),
            Source::Vault(path) => path.fields.clone(),
        }
    }

    /// The key the pod makes for it, when the private key stays in the pod.
    pub fn pod_key(&self) -> Option<PodKey> {
        match self {
            Source::Ssh(_) => Some(PodKey::SshEd25519),
            Source::Pki(pki) if pki.key == KeyMaker::Pod => Some(PodKey::Pkcs10),
            _ => None,
        }
    }

    /// Whether its credentials expire and are renewed or rotated by the broker.
    pub fn is_leased(&self) -> bool {
        !matches!(self, Source::Kv2(_))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_kind(f)?;
        match self.namespace() {
            Some(namespace) => write!(f, " in namespace {namespace}"),
            None => Ok(()),
        }
    }
}

impl Source {
    fn fmt_kind(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Kv2(kv) => {
                write!(f, "kv2 {}/{}", kv.mount, kv.path)?;
                if let Some(keys) = &kv.keys {
                    write!(f, " keys [{}]", keys.join(", "))?;
                }
                Ok(())
            }
            Source::Database(db) => write!(f, "database {}/creds/{}", db.mount, db.role),
            Source::Pki(pki) => {
                let endpoint = match pki.key {
                    KeyMaker::Vault => "issue",
                    KeyMaker::Pod => "sign",
                };
                write!(
                    f,
                    "pki {}/{endpoint}/{} cn `{}`",
                    pki.mount, pki.role, pki.common_name
                )?;
                if !pki.alt_names.is_empty() {
                    write!(f, " sans [{}]", pki.alt_names.join(", "))?;
                }
                if pki.key == KeyMaker::Pod {
                    write!(f, " key made by the pod")?;
                }
                Ok(())
            }
            Source::Ssh(ssh) => {
                write!(f, "ssh {}/sign/{}", ssh.mount, ssh.role)?;
                if !ssh.principals.is_empty() {
                    write!(f, " principals [{}]", ssh.principals.join(", "))?;
                }
                if !ssh.extensions.is_empty() {
                    let names: Vec<&str> = ssh.extensions.keys().map(String::as_str).collect();
                    write!(f, " extensions [{}]", names.join(", "))?;
                }
                Ok(())
            }
            Source::Vault(path) => {
                let operation = if path.write { "write" } else { "read" };
                write!(f, "vault {operation} {}", path.path)?;
                if !path.data.is_empty() {
                    let keys: Vec<&str> = path.data.keys().map(String::as_str).collect();
                    write!(f, " data [{}]", keys.join(", "))?;
                }
                if let Some(fields) = &path.fields {
                    write!(f, " fields [{}]", fields.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// A KV v2 secret: all its keys, or the chosen ones.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kv2Source {
    /// Mount path of the KV v2 engine, e.g. `secret`.
    pub mount: String,
    /// Secret path under the mount, e.g. `orders/db`.
    pub path: String,
    /// Keys to deliver; all keys when absent.
    pub keys: Option<Vec<String>>,
    /// The Vault namespace (full path, e.g. `team-a`) it lives in; the
    /// broker's own when absent.
    pub namespace: Option<String>,
}
