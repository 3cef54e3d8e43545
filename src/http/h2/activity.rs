//! What an HTTP/2 connection has in progress, so that one with nothing in
//! progress can be closed like an idle HTTP/1.1 keep-alive connection. hyper
//! keeps no such count for a server connection, and a stream outlives its
//! service call: a response body streams on after it, a WebSocket's tunnel
//! runs for hours. So each stream holds a [`StreamGuard`] for as long as it
//! is in use, moved into its response body or its tunnel task.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::body::ProxyBody;

#[derive(Clone, Default)]
pub(crate) struct Activity(Arc<Shared>);

#[derive(Default)]
struct Shared {
    open: AtomicUsize,
    changed: Notify,
}

/// One stream in use; dropping it ends that use.
pub(crate) struct StreamGuard(Activity);

impl Activity {
    pub(crate) fn begin(&self) -> StreamGuard {
        if self.0.open.fetch_add(1, Ordering::AcqRel) == 0 {
            self.0.changed.notify_waiters();
        }
        StreamGuard(self.clone())
    }

    /// Resolves once no stream has been in use for `limit` without a break.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a change between the
            // read and the wait still wakes us.
            changed.as_mut().enable();
            if self.0.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(limit) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.0.changed.notify_waiters();
        }
    }
}

impl StreamGuard {
    /// A second use of the same connection, for what outlives this one
    /// (a WebSocket's tunnel outlives the 200 that opened it).
    pub(crate) fn another(&self) -> StreamGuard {
        self.0.begin()
    }

    /// The response body carries the guard: the stream is in use until its
    /// last byte has gone or the client reset it.
    pub(crate) fn held_by(self, body: ProxyBody) -> ProxyBody {
        use http_body_util::BodyExt;
        body.map_frame(move |frame| {
            let _in_use = &self;
            frame
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_the_last_stream_ends_and_the_limit_passes() {
        let activity = Activity::default();
        let limit = Duration::from_secs(10);
        let first = activity.begin();
        let second = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(limit).await }
        });
        tokio::time::sleep(limit * 3).await;
        assert!(!idle.is_finished(), "streams in use: not idle");
        drop(first);
        tokio::time::sleep(limit * 3).await;
        assert!(!idle.is_finished(), "one stream still in use");
        drop(second);
        tokio::time::sleep(limit / 2).await;
        let third = activity.begin();
        tokio::time::sleep(limit).await;
        assert!(!idle.is_finished(), "a new stream restarts the wait");
        drop(third);
        let ended = tokio::time::timeout(limit + Duration::from_millis(1), idle).await;
        assert!(matches!(ended, Ok(Ok(()))), "idle once the limit passed");
    }
}
