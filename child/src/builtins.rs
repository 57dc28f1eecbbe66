//! Built-in functions every agent registers (see [`crate::Registry::new`]).

use mitogen_core::{remote_fn, Bytes};
use serde::{Deserialize, Serialize};

/// Result of [`run_command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// Exit code, or `None` if killed by a signal.
    pub code: Option<i32>,
    /// Captured standard output.
    pub stdout: Bytes,
    /// Captured standard error.
    pub stderr: Bytes,
}

remote_fn! {
    /// Returns the agent's process id.
    pub fn getpid() -> u32 { std::process::id() }
}

remote_fn! {
    /// Runs `argv` (no shell) and returns its exit code and output.
    pub fn run_command(argv: Vec<String>) -> Result<CommandOutput, std::io::Error> {
        let (prog, args) = argv.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv")
        })?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args).stdin(std::process::Stdio::null());
        let out = mitogen_transport_local::output(&mut cmd)?;
        Ok(CommandOutput { code: out.status.code(), stdout: out.stdout.into(), stderr: out.stderr.into() })
    }
}

remote_fn! {
    /// Reads a whole file.
    pub fn read_file(path: String) -> Result<Bytes, std::io::Error> {
        std::fs::read(path).map(Bytes)
    }
}

remote_fn! {
    /// Writes a whole file (created or truncated).
    pub fn write_file(path: String, data: Bytes) -> Result<(), std::io::Error> {
        std::fs::write(path, &data.0)
    }
}

remote_fn! {
    /// Returns the agent's environment.
    pub fn environ() -> Vec<(String, String)> { std::env::vars().collect() }
}

pub(crate) fn register(r: crate::Registry) -> crate::Registry {
    r.register(getpid).register(run_command).register(read_file).register(write_file).register(environ)
}
