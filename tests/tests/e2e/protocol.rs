//! The wire under abuse: bad frames cost only their own connection, never the daemon.

use std::time::Duration;

use memobuild_protocol::{
    ErrorCode, Hello, HelloReply, MAX_FRAME_LEN, PACKAGE_VERSION, Request, Response, frame,
    read_frame, write_frame,
};
use memobuild_tests::TestDaemon;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const LIMIT: Duration = Duration::from_secs(10);

async fn handshaken(daemon: &TestDaemon) -> UnixStream {
    let mut stream = UnixStream::connect(&daemon.socket).await.expect("connect");
    write_frame(&mut stream, &Hello::current(PACKAGE_VERSION))
        .await
        .expect("hello");
    let reply: HelloReply = read_frame(&mut stream)
        .await
        .expect("reply")
        .expect("frame");
    assert_eq!(reply.refusal, None);
    stream
}

/// Reads what the daemon sends until it closes the connection; fails if it never does.
async fn replies_until_close(stream: &mut UnixStream) -> Vec<Response> {
    let mut replies = Vec::new();
    loop {
        match tokio::time::timeout(LIMIT, read_frame::<_, Response>(stream))
            .await
            .expect("the daemon closes a connection that sent a bad frame")
        {
            Ok(Some(reply)) => replies.push(reply),
            Ok(None) | Err(_) => return replies,
        }
    }
}

async fn still_serves(daemon: &TestDaemon) {
    let mut conn = daemon.connect().await;
    let reply = conn.call(&Request::Status).await.expect("status");
    assert!(matches!(reply, Response::Status(_)), "{reply:?}");
}

fn error_code(replies: &[Response]) -> Option<ErrorCode> {
    replies.iter().find_map(|r| match r {
        Response::Error(e) => Some(e.code),
        _ => None,
    })
}

#[tokio::test]
async fn handshake_then_status_over_the_raw_socket() {
    let daemon = TestDaemon::start();
    let mut stream = handshaken(&daemon).await;
    write_frame(&mut stream, &Request::Status)
        .await
        .expect("send");
    let reply: Response = read_frame(&mut stream).await.expect("read").expect("frame");
    let Response::Status(report) = reply else {
        panic!("expected status, got {reply:?}");
    };
    assert_eq!(report.pid, daemon.pid());
}

#[tokio::test]
async fn protocol_version_mismatch_is_refused_with_both_versions() {
    let daemon = TestDaemon::start();
    let mut stream = UnixStream::connect(&daemon.socket).await.expect("connect");
    let hello = Hello {
        protocol_version: 999,
        ..Hello::current("9.9.9")
    };
    write_frame(&mut stream, &hello).await.expect("hello");
    let reply: HelloReply = read_frame(&mut stream)
        .await
        .expect("reply")
        .expect("frame");
    let refusal = reply.refusal.expect("refused");
    assert_eq!(refusal.code, ErrorCode::VersionMismatch);
    assert!(
        refusal.message.contains("protocol 999"),
        "{}",
        refusal.message
    );
    assert!(
        refusal.message.contains(&format!(
            "protocol {}",
            memobuild_protocol::PROTOCOL_VERSION
        )),
        "{}",
        refusal.message
    );
    assert!(
        refusal.message.contains("memobuild daemon restart"),
        "{}",
        refusal.message
    );
    still_serves(&daemon).await;
}

#[tokio::test]
async fn malformed_request_frame_gets_an_error_and_a_close() {
    let daemon = TestDaemon::start();
    let mut stream = handshaken(&daemon).await;
    // A well-formed frame whose payload is no Request.
    let payload = [0xff_u8, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3];
    let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&payload);
    stream.write_all(&wire).await.expect("send");
    let replies = replies_until_close(&mut stream).await;
    assert_eq!(
        error_code(&replies),
        Some(ErrorCode::InvalidInput),
        "{replies:?}"
    );
    still_serves(&daemon).await;
}

#[tokio::test]
async fn length_prefix_over_the_maximum_gets_an_error_and_a_close() {
    let daemon = TestDaemon::start();
    let mut stream = handshaken(&daemon).await;
    stream
        .write_all(&(MAX_FRAME_LEN + 1).to_be_bytes())
        .await
        .expect("send");
    let replies = replies_until_close(&mut stream).await;
    assert_eq!(
        error_code(&replies),
        Some(ErrorCode::ResourceExhausted),
        "{replies:?}"
    );
    still_serves(&daemon).await;
}

#[tokio::test]
async fn truncated_frame_closes_only_that_connection() {
    let daemon = TestDaemon::start();
    let mut stream = handshaken(&daemon).await;
    let mut wire = frame::encode(&Request::Status).expect("encode");
    wire[..4].copy_from_slice(&100u32.to_be_bytes());
    stream.write_all(&wire).await.expect("send");
    stream.shutdown().await.expect("half-close");
    let replies = replies_until_close(&mut stream).await;
    assert!(
        replies.is_empty() || error_code(&replies) == Some(ErrorCode::InvalidInput),
        "{replies:?}"
    );
    still_serves(&daemon).await;
}

#[tokio::test]
async fn random_bytes_instead_of_a_handshake_are_refused() {
    let daemon = TestDaemon::start();
    // Several seeds: some read as huge lengths, some as short garbage frames.
    for seed in [1u64, 7, 42, 0xdead_beef, 99_991] {
        let mut stream = UnixStream::connect(&daemon.socket).await.expect("connect");
        let noise = xorshift_bytes(seed, 4096);
        // The daemon may close before reading everything; a broken pipe is fine.
        let _ = stream.write_all(&noise).await;
        let _ = stream.shutdown().await;
        let reply = tokio::time::timeout(LIMIT, read_frame::<_, HelloReply>(&mut stream))
            .await
            .expect("the daemon answers or closes");
        if let Ok(Some(reply)) = reply {
            let refusal = reply.refusal.expect("random bytes are never accepted");
            assert!(
                matches!(
                    refusal.code,
                    ErrorCode::InvalidInput | ErrorCode::ResourceExhausted
                ),
                "{refusal:?}"
            );
        }
    }
    still_serves(&daemon).await;
}

#[tokio::test]
async fn gc_and_cache_stats_answer_and_the_connection_stays_usable() {
    let daemon = TestDaemon::start();
    let mut conn = daemon.connect().await;
    let gc = Request::Gc(memobuild_protocol::GcRequest {
        keep_bytes: None,
        dry_run: true,
        keep_duration_secs: None,
        all: true,
        cache_mounts_only: false,
    });
    match conn.call(&gc).await.expect("gc") {
        Response::Gc(report) => assert!(report.dry_run && report.complete, "{report:?}"),
        other => panic!("unexpected {other:?}"),
    }
    match conn.call(&Request::CacheStats).await.expect("cache stats") {
        Response::CacheStats(stats) => {
            assert!(stats.l2_budget_bytes >= 2 << 30, "{stats:?}");
            assert!(
                stats.total_bytes > 0,
                "the index and directories: {stats:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let reply = conn.call(&Request::Status).await.expect("status");
    assert!(matches!(reply, Response::Status(_)));
}

fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = memobuild_tests::workload::XorShift(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn client_explains_a_version_mismatch_and_how_to_fix_it() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("old.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    // Plays a daemon of protocol 99: reads the hello, refuses it as such a daemon would.
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).expect("hello length");
        let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
        conn.read_exact(&mut hello).expect("hello");
        let hello: Hello = frame::decode(&hello).expect("client sends a valid hello");
        let reply = HelloReply {
            protocol_version: 99,
            daemon_version: "9.0.0".into(),
            pid: 1,
            refusal: Some(memobuild_protocol::ErrorReply {
                code: ErrorCode::VersionMismatch,
                message: format!("client speaks protocol {}", hello.protocol_version),
            }),
        };
        conn.write_all(&frame::encode(&reply).expect("encode"))
            .expect("reply");
    });
    let output = std::process::Command::new(memobuild_tests::bin("memobuild"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .expect("run client");
    fake.join().expect("fake daemon");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "protocol {}",
            memobuild_protocol::PROTOCOL_VERSION
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("daemon 9.0.0 speaks protocol 99"),
        "{stderr}"
    );
    assert!(stderr.contains("memobuild daemon restart"), "{stderr}");
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test]
async fn twenty_slow_16_mib_frames_pin_neither_memory_nor_connections() {
    let daemon = TestDaemon::start();
    let before = rss_bytes(daemon.pid());
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(handshaken(&daemon).await);
    }
    // Each announces a frame of the largest size, sends all of it but its last byte, and
    // then nothing: twenty of them would pin 320 MiB in a daemon that holds them all.
    let body = vec![0u8; MAX_FRAME_LEN as usize - 1];
    for stream in &mut streams {
        let _ = stream.write_all(&MAX_FRAME_LEN.to_be_bytes()).await;
        // A refused connection is closed under the write; that is an answer too.
        let _ = tokio::time::timeout(LIMIT, stream.write_all(&body)).await;
    }
    let during = rss_bytes(daemon.pid());
    let growth = during.saturating_sub(before);
    eprintln!(
        "daemon RSS {} MiB before, {} MiB with twenty 16 MiB frames in flight",
        before >> 20,
        during >> 20
    );
    assert!(growth < 100 << 20, "RSS grew by {} MiB", growth >> 20);
    // Every one of them is answered and closed: refused at once, or when its frame did not
    // arrive in time.
    let mut refused = 0;
    for stream in &mut streams {
        let replies = tokio::time::timeout(Duration::from_secs(30), replies_until_close(stream))
            .await
            .expect("closed");
        match error_code(&replies) {
            Some(ErrorCode::ResourceExhausted) => refused += 1,
            Some(ErrorCode::InvalidInput) | None => {}
            other => panic!("{other:?}: {replies:?}"),
        }
    }
    assert!(refused >= 10, "only {refused} of 20 refused");
    still_serves(&daemon).await;
}
