//! Work the process still owes once a client's answer has ended (usage
//! settlement), counted so that whoever would stop the process waits for it:
//! the Lambda settle extension before the environment is frozen, relay-local
//! before it exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// Answers begun since start (one per Lambda invocation).
    answers_started: u64,
    /// Answers still being produced plus work still owed after them.
    busy: usize,
    /// Answers the settle extension has already waited for.
    answers_waited_for: u64,
}

/// A cheap handle; clones count into the same tally.
#[derive(Clone, Debug)]
pub struct InFlight(Arc<watch::Sender<Counts>>);

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new()
    }
}

/// Held while an answer or its after-work runs; dropping it marks it done.
#[must_use = "the work counts as done as soon as this is dropped"]
#[derive(Debug)]
pub struct Busy(InFlight);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.send_modify(|counts| counts.busy -= 1);
    }
}

impl InFlight {
    pub fn new() -> InFlight {
        InFlight(Arc::new(watch::Sender::new(Counts::default())))
    }

    /// An answer is being produced; hold the guard until its body is gone.
    pub fn answer(&self) -> Busy {
        self.0.send_modify(|counts| {
            counts.answers_started += 1;
            counts.busy += 1;
        });
        Busy(self.clone())
    }

    /// Work that must finish although the answer has ended.
    pub fn after_work(&self) -> Busy {
        self.0.send_modify(|counts| counts.busy += 1);
        Busy(self.clone())
    }

    /// Resolves once nothing is running.
    pub async fn idle(&self) {
        let mut counts = self.0.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = counts.wait_for(|counts| counts.busy == 0).await;
    }

    /// Waits, after the Lambda service announced an invocation, until its
    /// answer and everything it owes are done. Lambda announces one
    /// invocation at a time, and the settle extension is the only caller.
    ///
    /// The invocation's answer normally begins within milliseconds of the
    /// announcement; if the runtime never calls the handler (an event it
    /// cannot parse) waiting ends after `start_within`, so the environment
    /// is not held until the function's timeout.
    pub async fn invocation_done(&self, start_within: Duration) {
        let mut counts = self.0.subscribe();
        let waited_for = counts.borrow().answers_waited_for;
        let started = tokio::time::timeout(start_within, async {
            counts
                .wait_for(|counts| counts.answers_started > waited_for)
                .await
                .map(|counts| counts.answers_started)
        })
        .await;
        if let Ok(Ok(answers_started)) = started {
            self.0
                .send_modify(|counts| counts.answers_waited_for = answers_started);
        }
        let _ = counts.wait_for(|counts| counts.busy == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_answer_and_the_work_it_owes() {
        let in_flight = InFlight::new();
        in_flight.idle().await;

        let answer = in_flight.answer();
        let work = in_flight.after_work();
        drop(answer);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "after-work still runs");
        drop(work);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle once the work is done")
            .expect("no panic");
    }

    #[tokio::test]
    async fn an_invocation_is_done_only_after_its_answer_began_and_everything_ended() {
        let in_flight = InFlight::new();
        // The announcement comes first; the handler starts a moment later.
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.invocation_done(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "idle, but the answer has not begun");
        let answer = in_flight.answer();
        let work = in_flight.after_work();
        drop(answer);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the settlement is still running");
        drop(work);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("done once the settlement ended")
            .expect("no panic");
    }

    #[tokio::test]
    async fn an_invocation_whose_handler_never_runs_is_not_held() {
        let in_flight = InFlight::new();
        tokio::time::timeout(
            Duration::from_secs(1),
            in_flight.invocation_done(Duration::from_millis(30)),
        )
        .await
        .expect("gives up waiting for the handler");

        // The next invocation waits for its own answer, not the missed one's.
        let answer = in_flight.answer();
        let work = in_flight.after_work();
        drop(answer);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.invocation_done(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "its settlement is still running");
        drop(work);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("done once its settlement ended")
            .expect("no panic");

        // And a third begins afresh: waiting for an answer that has not begun.
        let third = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.invocation_done(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "the third answer has not begun");
        drop(in_flight.answer());
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("done once the third answer ended")
            .expect("no panic");
    }
}
