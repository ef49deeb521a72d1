//! Process memory hygiene for the broker and the sidecar, which hold
//! credentials: secrets must not outlive their use in memory, nor leave the
//! process through a core dump or a swap page.
//!
//! - [`ZeroOnFree`], the global allocator of both binaries (feature
//!   `zeroize-on-free`, on by default): every heap block is cleared when it is
//!   freed, whichever crate owned it (hyper's, serde_json's, prost's and
//!   rustls' buffers included), so a rotated-away password does not linger in
//!   freed memory. Blocks still in use are not cleared: secrets are kept in
//!   `zeroize` types and out of long-lived buffers.
//! - [`harden`], called first thing in `main`: marks the process non-dumpable
//!   (`PR_SET_DUMPABLE` 0: no core dump, no `/proc/PID/mem` for other users)
//!   and sets `RLIMIT_CORE` to 0, then locks memory (`mlockall`) where the
//!   process may, so secrets never reach swap. Vault does the same.

use std::fmt;

use rustix::{
    mm::MlockAllFlags,
    process::{DumpableBehavior, Resource, Rlimit},
};

/// The zero-on-free allocator over the system allocator (1Password's
/// `zeroizing-alloc`). Declare it in a binary:
///
/// ```
/// #[global_allocator]
/// static ALLOC: tessera_memory::ZeroOnFree = tessera_memory::ZERO_ON_FREE;
///
/// fn main() {
///     let password = String::from("rotated away");
///     drop(password); // its bytes are zero before the block returns to the system
/// }
/// ```
pub type ZeroOnFree = zeroizing_alloc::ZeroAlloc<std::alloc::System>;

/// The value of [`ZeroOnFree`].
pub const ZERO_ON_FREE: ZeroOnFree = zeroizing_alloc::ZeroAlloc(std::alloc::System);

/// Bit of `CAP_IPC_LOCK` in `/proc/self/status` `CapEff`.
const CAP_IPC_LOCK: u32 = 14;

/// Whether to lock memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lock {
    /// Lock when the process may (it has `CAP_IPC_LOCK`, or no memlock
    /// limit); otherwise log why not and go on.
    IfAllowed,
    /// Do not lock.
    Off,
}

/// What [`harden`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps are off (non-dumpable and `RLIMIT_CORE` 0).
    pub no_dumps: bool,
    /// All memory, present and future, is locked in RAM.
    pub locked: bool,
    /// Why memory is not locked, when it is not.
    pub not_locked_because: Option<String>,
}

impl fmt::Display for Hardening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "core dumps {}, memory {}",
            if self.no_dumps { "off" } else { "NOT off" },
            if self.locked { "locked" } else { "not locked" }
        )
    }
}

/// Turns core dumps off and locks memory as `lock` says. Never fails: what
/// cannot be done is reported (and logged by the caller).
pub fn harden(lock: Lock) -> Hardening {
    let dumpable = rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable);
    let core = rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    let no_dumps = dumpable.is_ok() && core.is_ok();
    let (locked, not_locked_because) = match lock {
        Lock::Off => (false, Some("memory locking is switched off".to_owned())),
        Lock::IfAllowed => match lock_allowed() {
            Err(why) => (false, Some(why)),
            Ok(()) => match rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE) {
                Ok(()) => (true, None),
                Err(error) => (false, Some(format!("mlockall failed: {error}"))),
            },
        },
    };
    Hardening {
        no_dumps,
        locked,
        not_locked_because,
    }
}

/// Whether `mlockall(MCL_FUTURE)` is safe: with `CAP_IPC_LOCK`, or without a
/// memlock limit. Under a limit, locking future memory would make the
/// process's allocations fail once it grows past it.
fn lock_allowed() -> Result<(), String> {
    if has_ipc_lock() {
        return Ok(());
    }
    match rustix::process::getrlimit(Resource::Memlock).current {
        None => Ok(()),
        Some(limit) => Err(format!(
            "the process lacks CAP_IPC_LOCK and may lock only {limit} bytes (add IPC_LOCK to the container's securityContext.capabilities to keep secrets out of swap)"
        )),
    }
}

fn has_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_as_one_line() {
        let report = Hardening {
            no_dumps: true,
            locked: false,
            not_locked_because: Some("memory locking is switched off".to_owned()),
        };
        assert_eq!(report.to_string(), "core dumps off, memory not locked");
    }

    #[test]
    fn capability_bits_are_read_from_proc() {
        // As root (CI), the effective set has CAP_IPC_LOCK.
        let root = rustix::process::geteuid().is_root();
        assert_eq!(has_ipc_lock(), root);
    }
}
