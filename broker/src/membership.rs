//! Who is in the cluster of replicas and who owns what: the live members
//! (this replica and the peers whose streams are open) and the rendezvous
//! hashing that picks one owner per key, the same on every replica. The
//! peer channel ([`crate::peers`]) keeps the members; the KV feeds ask who
//! reads a secret.

use std::{collections::BTreeSet, sync::Mutex};

use crate::policy::Kv2Source;

/// The live members of the cluster and who owns what.
#[derive(Debug)]
pub struct Peers {
    me: String,
    live: Mutex<BTreeSet<String>>,
}

impl Peers {
    /// A cluster of this replica (`me`) alone until its peers are seen.
    pub fn new(me: String) -> Self {
        Self {
            me,
            live: Mutex::new(BTreeSet::new()),
        }
    }

    /// This replica's peer address.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Marks `peer` live (its stream is open) or gone.
    pub fn set_live(&self, peer: &str, live: bool) {
        let mut set = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if live {
            set.insert(peer.to_owned())
        } else {
            set.remove(peer)
        };
        if changed {
            tracing::info!(
                peer,
                live,
                members = set.len() + 1,
                "peer membership changed"
            );
        }
    }

    /// The live members, this replica among them.
    pub fn members(&self) -> Vec<String> {
        let set = self.live.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.me.clone())
            .chain(set.iter().cloned())
            .collect()
    }

    /// Whether this replica owns `key` among the live members.
    pub fn owns(&self, key: &str) -> bool {
        owner(&self.members(), key).is_some_and(|owner| *owner == self.me)
    }
}

/// The member that owns `key`: the highest rendezvous weight (SHA-256 of
/// the member and the key); every replica computes the same from the same
/// members.
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a String> {
    members.iter().max_by_key(|member| {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(member.as_bytes());
        context.update(&[0]);
        context.update(key.as_bytes());
        let digest = context.finish();
        let mut weight = [0u8; 8];
        weight.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(weight)
    })
}

/// The ownership key of a KV source: the same text on every replica.
pub fn source_key(source: &Kv2Source) -> String {
    format!(
        "kv2 {}|{}|{}|{}",
        source.namespace.as_deref().unwrap_or_default(),
        source.mount,
        source.path,
        source
            .keys
            .as_ref()
            .map_or_else(|| "*".to_owned(), |keys| keys.join(","))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_computes_the_same_owner_and_only_a_gone_owners_keys_move() {
        let members: Vec<String> = ["a:1", "b:1", "c:1"].map(str::to_owned).to_vec();
        let keys: Vec<String> = (0..300).map(|n| format!("kv2 |secret|app{n}|*")).collect();
        let owners: Vec<&String> = keys.iter().map(|k| owner(&members, k).unwrap()).collect();
        for member in &members {
            let share = owners.iter().filter(|o| **o == member).count();
            assert!((50..=150).contains(&share), "{member} owns {share} of 300");
        }
        let survivors: Vec<String> = members[1..].to_vec();
        for (key, before) in keys.iter().zip(&owners) {
            let after = owner(&survivors, key).unwrap();
            if *before != "a:1" {
                assert_eq!(after, *before, "a key of a survivor stays put");
            }
        }
    }

    #[test]
    fn a_replica_alone_owns_everything_and_shares_once_a_peer_is_live() {
        let peers = Peers::new("a:1".to_owned());
        let keys: Vec<String> = (0..50).map(|n| format!("k{n}")).collect();
        assert!(keys.iter().all(|k| peers.owns(k)));
        peers.set_live("b:1", true);
        let owned = keys.iter().filter(|k| peers.owns(k)).count();
        assert!(owned > 0 && owned < 50, "{owned}");
        peers.set_live("b:1", false);
        assert!(keys.iter().all(|k| peers.owns(k)));
    }
}
