//! The threads TCP services accept and relay on: one current-thread tokio runtime per thread, and
//! every TCP service has one listener per thread in a `SO_REUSEPORT` group. The kernel spreads
//! new connections over the listeners by their 4-tuple hash, and a connection then lives on the
//! thread that accepted it until it closes: no hand-off between threads, no work stealing, no
//! waking of a parked worker for a task another thread queued (the model of `HAProxy`'s threads
//! and nginx's workers).

use std::{io, sync::mpsc, thread};

use tokio::{runtime, sync::oneshot, task::JoinHandle};

/// Handles of the proxy's runtimes; dropping it stops their threads (and every task on them).
#[derive(Debug)]
pub struct ProxyThreads {
    handles: Vec<runtime::Handle>,
    /// Dropped with `self`: each thread's `block_on` then returns and its runtime shuts down.
    _stop: Vec<oneshot::Sender<()>>,
}

impl ProxyThreads {
    /// `n` threads (at least one), named `lb-proxy-0`, `lb-proxy-1`, …
    pub fn start(n: usize) -> io::Result<ProxyThreads> {
        let mut handles = Vec::with_capacity(n.max(1));
        let mut stop = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let (handle_tx, handle_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            thread::Builder::new()
                .name(format!("lb-proxy-{i}"))
                .spawn(move || {
                    let rt = match runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    // Until the ProxyThreads is dropped (or the process ends).
                    let _ = rt.block_on(stop_rx);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other(format!("lb-proxy-{i} ended at start")))??;
            handles.push(handle);
            stop.push(stop_tx);
        }
        Ok(ProxyThreads {
            handles,
            _stop: stop,
        })
    }

    /// How many threads (listeners per TCP service); at least one.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs the `i`-th task on thread `i` (wrapping around if there are more tasks than threads).
    pub fn spawn_all<Fut>(&self, tasks: impl IntoIterator<Item = Fut>) -> Vec<JoinHandle<()>>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        tasks
            .into_iter()
            .zip(self.handles.iter().cycle())
            .map(|(task, h)| h.spawn(task))
            .collect()
    }
}

/// The tasks of one service: a listener loop per proxy thread (TCP) or its socket loop (UDP).
#[derive(Debug, Default)]
pub struct Tasks(pub Vec<JoinHandle<()>>);

impl Tasks {
    /// Some task has not ended.
    pub fn running(&self) -> bool {
        self.0.iter().any(|t| !t.is_finished())
    }

    pub fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
