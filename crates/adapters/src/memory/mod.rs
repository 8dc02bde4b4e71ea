//! In-memory adapters: complete implementations of the contracts, kept in process
//! memory. Everything is lost with the process; use them for tests and simulations.

mod compute;
mod ledger;
mod queue;
mod secrets;
mod tokens;

pub use compute::MemoryCompute;
pub use ledger::MemoryLedger;
pub use queue::MemoryQueue;
pub use secrets::MemorySecrets;
pub use tokens::MemoryTokens;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
