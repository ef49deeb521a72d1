use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn limits(max: usize) -> ConnectionLimits {
    ConnectionLimits {
        max,
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        max_age: Duration::from_secs(60),
    }
}

#[tokio::test(start_paused = true)]
async fn silent_peers_time_out_and_talkers_stay() {
    let gate = Gate::new("test", limits(8));
    let (client, server) = tokio::io::duplex(64);
    let mut guarded = gate.admit(server).unwrap();
    let mut byte = [0u8; 1];
    let silent = guarded.read(&mut byte).await.unwrap_err();
    assert_eq!(silent.kind(), io::ErrorKind::TimedOut);

    let (mut client2, server2) = tokio::io::duplex(64);
    let mut talker = gate.admit(server2).unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        client2.write_all(b"x").await.unwrap();
        assert_eq!(talker.read(&mut byte).await.unwrap(), 1);
    }
    drop(client);
}

/// An HTTP/2 frame header: length, type, flags, stream.
fn frame(kind: u8, payload: usize) -> Vec<u8> {
    let len = u32::try_from(payload).unwrap().to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 1];
    bytes.resize(9 + payload, 0);
    bytes
}

#[test]
fn the_frame_scan_finds_the_first_request_in_any_chunking() {
    let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    stream.extend(frame(0x4, 12)); // SETTINGS
    stream.extend(frame(0x8, 4)); // WINDOW_UPDATE
    let before_request = stream.len();
    stream.extend(frame(0x1, 30)); // HEADERS
    for chunk in [1, 2, 7, 9, 100] {
        let mut scan = FrameScan::default();
        let found: Vec<bool> = stream.chunks(chunk).map(|c| scan.feed(c)).collect();
        let first = found.iter().position(|f| *f).expect("found");
        // Known once the HEADERS frame's ninth header byte is in.
        assert_eq!(first, (before_request + 8) / chunk, "chunk {chunk}");
    }
    let mut idle = FrameScan::default();
    assert!(
        !idle.feed(&stream[..before_request]),
        "preface and settings are not a request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_without_a_request_is_closed_at_the_deadline() {
    let (mut client, server) = tokio::io::duplex(256);
    let mut connection = FirstRequest::new(server, Duration::from_secs(3));
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    client.write_all(&frame(0x4, 0)).await.unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(connection.read(&mut buf).await.unwrap(), 33);
    let silent = connection.read(&mut buf).await.unwrap_err();
    assert_eq!(silent.kind(), io::ErrorKind::TimedOut);

    let (mut client, server) = tokio::io::duplex(256);
    let mut served = FirstRequest::new(server, Duration::from_secs(3));
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    client.write_all(&frame(0x1, 4)).await.unwrap();
    served.read_exact(&mut buf[..37]).await.unwrap();
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"x").await.unwrap();
        client
    });
    assert_eq!(
        served.read(&mut buf).await.unwrap(),
        1,
        "no deadline once served"
    );
    drop(later.await.unwrap());
}

#[tokio::test]
async fn the_cap_closes_new_connections_until_one_ends() {
    let gate = Gate::new("test", limits(2));
    let first = gate.admit(()).unwrap();
    let _second = gate.admit(()).unwrap();
    assert!(gate.admit(()).is_none());
    drop(first);
    assert!(gate.admit(()).is_some());
}

#[test]
fn the_cap_stays_below_half_the_open_file_limit() {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let huge = ConnectionLimits {
        max: usize::MAX,
        ..ConnectionLimits::default()
    };
    assert!(huge.effective_max() as u64 <= files / 2 + 1);
}
