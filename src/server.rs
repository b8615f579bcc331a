//! Runs the HTTP server on its own thread with a small tokio runtime.

use crate::engine::Shared;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Server {
    pub addr: SocketAddr,
    /// "https" with TLS, else "http".
    pub scheme: &'static str,
    thread: JoinHandle<()>,
}

impl Server {
    /// Binds `listen` now (so a bad address fails at start) and serves until the engine stops.
    /// With `signals`, Ctrl-C / SIGTERM stop the engine.
    pub fn start(listen: &str, shared: Arc<Shared>, signals: bool) -> Result<Server> {
        let key = match &shared.settings.cluster {
            Some(c) => format!("cluster.http[{}]", c.process),
            None => "http.listen / PERSONA_HTTP_LISTEN".to_string(),
        };
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen} ({key})"))?;
        std_listener.set_nonblocking(true)?;
        let tls = match &shared.settings.http.tls {
            Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = std_listener.local_addr()?;
        let threads = shared.settings.http.threads;
        let cpus = shared.settings.http.cpus.clone();
        let runtime = if threads > 1 {
            // The "http" thread drives the listener; these share the connections with it.
            let pin = cpus.clone();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("http-worker")
                .on_thread_start(move || crate::affinity::pin_current(&pin, "http-worker"))
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .context("cannot start the HTTP runtime")?;
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                // Whatever ends this thread (even a panic) stops the engine: without it,
                // nothing would answer queries or signals.
                let _stop_on_exit = StopOnExit(shared.clone());
                crate::affinity::pin_current(&cpus, "http");
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("cannot use the HTTP listener: {e}");
                            shared.shutdown();
                            return;
                        }
                    };
                    let stop = shared.clone();
                    let shutdown = async move {
                        // One listener for the whole run: one made anew each round would miss
                        // a signal that arrives between two rounds.
                        let mut signal = signals.then(|| Box::pin(shutdown_signal()));
                        loop {
                            if stop.stopping() {
                                return;
                            }
                            match signal.as_mut() {
                                Some(signal) => tokio::select! {
                                    _ = signal => {
                                        stop.shutdown();
                                        if crate::cluster::forming(stop.settings.cluster.as_ref()) {
                                            // Nothing read yet, nothing to deliver.
                                            tracing::info!("signal received while waiting for the other processes, stopping");
                                            std::process::exit(0);
                                        }
                                        tracing::info!("signal received, stopping");
                                        return;
                                    }
                                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                                },
                                None => tokio::time::sleep(Duration::from_millis(100)).await,
                            }
                        }
                    };
                    crate::http::serve(listener, shared, tls, shutdown).await;
                })
            })?;
        Ok(Server {
            addr,
            scheme,
            thread,
        })
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
