//! What the client saw: every request and response goes to a JSON-lines file; per command the
//! harness keeps what the checks need (whether it was accepted, the result it converged on,
//! anything that diverged).

use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::util::elapsed_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Signup,
    TopUp,
    Purchase,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Signup => "signup",
            Kind::TopUp => "top_up",
            Kind::Purchase => "purchase",
        }
    }
}

/// A command the client sends, with its HTTP body.
#[derive(Debug, Clone)]
pub enum Intent {
    Signup {
        username: String,
        referral_code: Option<String>,
    },
    TopUp {
        amount: i64,
    },
    Purchase {
        item: &'static str,
        quantity: i64,
    },
}

/// How one HTTP attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Status {
        status: u16,
        body: Value,
        command_id: Option<Uuid>,
        replayed: Option<bool>,
    },
    Timeout,
    Connect(String),
    /// The connection broke mid-request (reset, closed) or another transport error.
    Broken(String),
}

/// What the harness keeps per command (one Idempotency-Key).
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub kind: Kind,
    /// What was sent, so the command can be retried once more after the drain.
    pub intent: Intent,
    pub key: String,
    pub principal: String,
    /// Derived locally from (principal, key), as the gateway does.
    pub command_id: Uuid,
    /// The player the command is about (for a signup, the player it creates).
    pub player_id: Uuid,
    /// For signups: a referral code was sent (a valid one, or a deliberately bogus one).
    pub referral: Option<String>,
    pub attempts: u32,
    /// Any attempt answered 200 or 202.
    pub accepted: bool,
    pub accepted_202: bool,
    /// The first result (200, 409, 422, 404) the client got.
    pub result: Option<(u16, Value)>,
    /// Later results that differ from the first one.
    pub divergent: Vec<(u16, Value)>,
    /// Statuses that are neither results nor retryable (400, 401, 500, ...), with their bodies.
    pub unexpected: Vec<(u16, Value)>,
    /// X-Command-Id headers that differ from the locally derived id.
    pub foreign_ids: Vec<Uuid>,
    /// A 200 body showed a negative balance.
    pub negative_balance_seen: bool,
    /// Racing duplicate deliveries the harness published for this command (confirmed).
    pub duplicates_published: u32,
    /// The client saw no result during the run; `result` comes from the retry after the drain.
    pub resolved_after_drain: bool,
}

/// Statuses that are a command's result, stored by the worker and replayed on retries.
pub fn is_result_status(status: u16) -> bool {
    matches!(status, 200 | 404 | 409 | 422)
}

/// Statuses after which the client retries with the same key (429: after its Retry-After).
pub fn is_retry_status(status: u16) -> bool {
    matches!(status, 202 | 429 | 502 | 503 | 504)
}

impl CommandRecord {
    pub fn new(
        kind: Kind,
        intent: Intent,
        key: String,
        principal: String,
        command_id: Uuid,
        player_id: Uuid,
        referral: Option<String>,
    ) -> Self {
        Self {
            kind,
            intent,
            key,
            principal,
            command_id,
            player_id,
            referral,
            attempts: 0,
            accepted: false,
            accepted_202: false,
            result: None,
            divergent: Vec::new(),
            unexpected: Vec::new(),
            foreign_ids: Vec::new(),
            negative_balance_seen: false,
            duplicates_published: 0,
            resolved_after_drain: false,
        }
    }

    /// Folds one attempt into the record.
    pub fn observe(&mut self, outcome: &AttemptOutcome) {
        self.attempts += 1;
        let AttemptOutcome::Status {
            status,
            body,
            command_id,
            ..
        } = outcome
        else {
            return;
        };
        if let Some(id) = command_id
            && *id != self.command_id
        {
            self.foreign_ids.push(*id);
        }
        match *status {
            200 | 202 => {
                self.accepted = true;
                if *status == 202 {
                    self.accepted_202 = true;
                }
            }
            _ => {}
        }
        if *status == 200 && body["balance"].as_i64().is_some_and(|balance| balance < 0) {
            self.negative_balance_seen = true;
        }
        if is_result_status(*status) {
            match &self.result {
                None => self.result = Some((*status, body.clone())),
                Some((first_status, first_body)) => {
                    if first_status != status || first_body != body {
                        self.divergent.push((*status, body.clone()));
                    }
                }
            }
        } else if !is_retry_status(*status) {
            self.unexpected.push((*status, body.clone()));
        }
    }

    /// The client got a final answer (a result, or something it must not retry).
    pub fn settled(&self) -> bool {
        self.result.is_some() || !self.unexpected.is_empty()
    }
}

/// Appends every request and response to a JSON-lines file, off the request path.
#[derive(Clone)]
pub struct RequestLog {
    sender: mpsc::UnboundedSender<String>,
}

impl RequestLog {
    /// Starts the writer task; it ends when every sender is dropped.
    pub fn start(path: &Path) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let file = std::fs::File::create(path)?;
        let (sender, mut receiver) = mpsc::unbounded_channel::<String>();
        let writer = tokio::task::spawn_blocking(move || {
            let mut file = std::io::BufWriter::new(file);
            while let Some(line) = receiver.blocking_recv() {
                if writeln!(file, "{line}").is_err() {
                    break;
                }
            }
            drop(file.flush());
        });
        Ok((Self { sender }, writer))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attempt(
        &self,
        what: &str,
        key: Option<&str>,
        principal: Option<&str>,
        command_id: Option<Uuid>,
        attempt: u32,
        outcome: &AttemptOutcome,
        elapsed_ms_of_request: u64,
    ) {
        let mut line = json!({
            "t_ms": elapsed_ms(),
            "request": what,
            "key": key,
            "principal": principal,
            "command_id": command_id,
            "attempt": attempt,
            "elapsed_ms": elapsed_ms_of_request,
        });
        match outcome {
            AttemptOutcome::Status {
                status,
                body,
                command_id,
                replayed,
            } => {
                line["status"] = json!(status);
                line["body"] = body.clone();
                line["x_command_id"] = json!(command_id);
                line["replayed"] = json!(replayed);
            }
            AttemptOutcome::Timeout => line["error"] = json!("timeout"),
            AttemptOutcome::Connect(error) => line["error"] = json!(format!("connect: {error}")),
            AttemptOutcome::Broken(error) => line["error"] = json!(format!("broken: {error}")),
        }
        drop(self.sender.send(line.to_string()));
    }

    pub fn note(&self, event: &str, details: Value) {
        drop(
            self.sender.send(
                json!({ "t_ms": elapsed_ms(), "event": event, "details": details }).to_string(),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CommandRecord {
        CommandRecord::new(
            Kind::TopUp,
            Intent::TopUp { amount: 5 },
            "k".to_string(),
            "player:x".to_string(),
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            None,
        )
    }

    fn status(status: u16, body: Value) -> AttemptOutcome {
        AttemptOutcome::Status {
            status,
            body,
            command_id: Some(Uuid::from_u128(1)),
            replayed: None,
        }
    }

    #[test]
    fn a_202_then_a_200_is_accepted_and_settled() {
        let mut record = record();
        record.observe(&AttemptOutcome::Timeout);
        record.observe(&status(503, json!({ "code": "broker_unavailable" })));
        assert!(!record.accepted && !record.settled());
        record.observe(&status(202, json!({ "status": "pending" })));
        assert!(record.accepted && record.accepted_202 && !record.settled());
        record.observe(&status(200, json!({ "balance": 5 })));
        assert!(record.settled());
        assert_eq!(record.result, Some((200, json!({ "balance": 5 }))));
        assert_eq!(record.attempts, 4);
        assert!(record.divergent.is_empty() && record.unexpected.is_empty());
    }

    #[test]
    fn a_different_later_result_is_divergent() {
        let mut record = record();
        record.observe(&status(409, json!({ "code": "insufficient_funds" })));
        record.observe(&status(409, json!({ "code": "insufficient_funds" })));
        assert!(record.divergent.is_empty());
        record.observe(&status(200, json!({ "balance": 5 })));
        assert_eq!(record.divergent.len(), 1);
        assert_eq!(
            record.result,
            Some((409, json!({ "code": "insufficient_funds" })))
        );
    }

    #[test]
    fn other_statuses_are_unexpected_and_foreign_ids_are_kept() {
        let mut record = record();
        record.observe(&AttemptOutcome::Status {
            status: 500,
            body: json!({}),
            command_id: Some(Uuid::from_u128(9)),
            replayed: None,
        });
        assert!(record.settled());
        assert_eq!(record.unexpected.len(), 1);
        assert_eq!(record.foreign_ids, vec![Uuid::from_u128(9)]);
    }

    #[test]
    fn a_negative_balance_in_a_200_is_noticed() {
        let mut record = record();
        record.observe(&status(200, json!({ "balance": -1 })));
        assert!(record.negative_balance_seen);
    }
}
