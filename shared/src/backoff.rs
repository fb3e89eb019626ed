use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff between retries, bounded above.
pub struct Backoff {
    next_ms: u64,
    max_ms: u64,
}

impl Backoff {
    const START_MS: u64 = 50;

    pub fn new(max_ms: u64) -> Self {
        Self {
            next_ms: Self::START_MS,
            max_ms: max_ms.max(Self::START_MS),
        }
    }

    pub fn reset(&mut self) {
        self.next_ms = Self::START_MS;
    }

    /// Sleeps for the next backoff step; false when `shutdown` was cancelled meanwhile.
    pub async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = Duration::from_millis(self.next_ms);
        self.next_ms = (self.next_ms * 2).min(self.max_ms);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}
