//! Log records forwarded from children to the master (handle FORWARD_LOG).

use serde::{Deserialize, Serialize};

/// One log record or captured output line, as it travels to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Name of the context it came from, e.g. `local.1`.
    pub context: String,
    /// `log::Level` as a number (1 = error ... 5 = trace).
    pub level: u8,
    /// The original target (`stdout` / `stderr` for captured output).
    pub target: String,
    /// The text.
    pub message: String,
}

/// Converts a level to its wire number.
pub fn level_to_u8(l: log::Level) -> u8 {
    l as usize as u8
}

/// Converts a wire number to a level (unknown numbers become `Trace`).
pub fn level_from_u8(n: u8) -> log::Level {
    match n {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

impl LogRecord {
    /// Re-emits the record through this process's `log` facade, with the target
    /// `mitogen::ctx::<context>` (and `::stdout` / `::stderr` for captured output).
    pub fn emit(&self) {
        let level = level_from_u8(self.level);
        let (target, text) = match self.target.as_str() {
            "stdout" | "stderr" => {
                (format!("mitogen::ctx::{}::{}", self.context, self.target), self.message.clone())
            }
            t => (format!("mitogen::ctx::{}", self.context), format!("{t}: {}", self.message)),
        };
        log::logger()
            .log(&log::Record::builder().level(level).target(&target).args(format_args!("{text}")).build());
    }
}
