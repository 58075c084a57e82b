//! Retries with exponential backoff and full jitter, honouring the server's Retry-After.

use std::time::Duration;

use rand::Rng;

use super::{ChatBackend, ChatRequest, ChatResponse, LlmError};

#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// How long to wait before retry number `retry` (0-based) after `error`. A server's
    /// Retry-After wins, capped at `max_delay`; one that is not a number of seconds (negative,
    /// NaN) is ignored.
    pub fn delay(&self, retry: u32, error: &LlmError) -> Duration {
        if let LlmError::Status {
            retry_after: Some(seconds),
            ..
        } = error
            && *seconds >= 0.0
        {
            return Duration::try_from_secs_f64(*seconds)
                .unwrap_or(Duration::MAX)
                .min(self.max_delay);
        }
        let ceiling = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        // Full jitter: uniform in [0, ceiling], so many clients backing off do not stampede.
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// Calls `backend` until it answers, fails for good, or retries run out. Returns the outcome
    /// and the number of attempts made.
    pub async fn run(
        &self,
        backend: &dyn ChatBackend,
        request: &ChatRequest,
    ) -> (Result<ChatResponse, LlmError>, u32) {
        self.retry(|| backend.complete(request)).await
    }

    /// Calls `attempt` until it succeeds, fails for good, or retries run out. Returns the
    /// outcome and the number of attempts made.
    pub async fn retry<T, F: Future<Output = Result<T, LlmError>>>(
        &self,
        mut attempt: impl FnMut() -> F,
    ) -> (Result<T, LlmError>, u32) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(value) => return (Ok(value), attempts),
                Err(e) if e.is_retryable() && attempts <= self.max_retries => {
                    let delay = self.delay(attempts - 1, &e);
                    tracing::debug!(attempt = attempts, delay_s = delay.as_secs_f64(), error = %e, "retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return (Err(e), attempts),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(retry_after: f64) -> LlmError {
        LlmError::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(retry_after),
        }
    }

    #[test]
    fn retry_after_is_capped_and_nonsense_falls_back_to_backoff() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(0, &status(2.5)), Duration::from_millis(2500));
        for huge in [1e20, f64::INFINITY, 1e300] {
            assert_eq!(policy.delay(0, &status(huge)), policy.max_delay);
        }
        for nonsense in [-1.0, f64::NAN, f64::NEG_INFINITY] {
            assert!(policy.delay(0, &status(nonsense)) <= policy.base_delay);
        }
    }
}
