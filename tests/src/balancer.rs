//! A loopback TCP balancer over broker replicas, standing in for the
//! Kubernetes Service in front of them: each new connection goes to the next
//! replica in turn that accepts it (a replica that is down is skipped, as
//! endpoints drop a pod that is not ready). Connections already made stay
//! where they are; bytes are piped both ways.

use std::{
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::cluster::pipe;

/// The running balancer; stops accepting when dropped.
pub struct Balancer {
    /// `https://127.0.0.1:PORT`, for sidecars and clients.
    pub uri: String,
    port: u16,
    stop: Arc<AtomicBool>,
    /// The connections it piped, to cut them.
    clients: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Balancer {
    /// Balances over the replicas listening on `ports` (127.0.0.1).
    pub fn start(ports: Vec<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let next = AtomicUsize::new(0);
        let stopping = stop.clone();
        let clients = Arc::new(std::sync::Mutex::new(Vec::new()));
        let piped = clients.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if let Ok(kept) = client.try_clone() {
                    piped.lock().unwrap().push(kept);
                }
                let first = next.fetch_add(1, Ordering::Relaxed);
                let upstream = (0..ports.len()).find_map(|offset| {
                    let port = ports[(first + offset) % ports.len()];
                    TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                        Duration::from_millis(500),
                    )
                    .ok()
                });
                match upstream {
                    Some(upstream) => pipe(client, upstream),
                    None => {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                }
            }
        });
        Self {
            uri: format!("https://127.0.0.1:{port}"),
            port,
            stop,
            clients,
        }
    }
}

impl Balancer {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops accepting and cuts every connection it piped, as a network
    /// fault would.
    pub fn cut(self) {
        for client in self.clients.lock().unwrap().drain(..) {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
