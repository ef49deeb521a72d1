//! The subcommands of `tessera-broker`, one module each; `main` parses the
//! command line and dispatches here.

pub mod audit;
pub mod dev;
pub mod policy;
pub mod serve;
pub mod status;

/// Exit statuses (sysexits.h), as docs/configuration.md lists them.
pub mod exit {
    /// EX_USAGE: the command line is wrong.
    pub const USAGE: u8 = 64;
    /// EX_NOINPUT: a file named on the command line does not exist.
    pub const NO_INPUT: u8 = 66;
    /// EX_UNAVAILABLE: a service the broker needs at start (Vault, the
    /// Kubernetes API) cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_NOPERM: a service refused the broker (its Vault or RBAC permissions).
    pub const NO_PERMISSION: u8 = 77;
    /// EX_CONFIG: the configuration (or a policy, key or certificate it
    /// names) is invalid.
    pub const CONFIG: u8 = 78;
    /// `policy diff --exit-code` when the policies could not be compared.
    pub const DIFF_ERROR: u8 = 2;
}

/// Prints `value` as pretty JSON on standard output.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => emit(&format!("{text}\n")),
        Err(error) => eprintln!("cannot print JSON: {error}"),
    }
}

/// Writes `text` to standard output. A reader that closed the pipe early
/// (`policy diff -o json | head`) ends the command quietly, as any Unix
/// filter does, instead of a panic in `println!`.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("cannot write to standard output: {error}");
    }
}
