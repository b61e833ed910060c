//! `memobuildd serve-cache`: a third-party REAPI client (BuildGrid's `bgd`), curl and the
//! daemon's own L3 client against our server, eviction, auth, TLS, crashes during uploads, a full disk, malformed requests,
//! build reports and signed webhooks. Every test runs its own server on a temp store.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use hmac::{KeyInit as _, Mac as _};
use memobuild_tests::cacheserver::{
    TestCacheServer, blob, digest, http, verify_store, write_requests,
};
use memobuild_tests::{privileged, python_tool, texts};
use memobuildd::cache::remote::mapping::{RemoteLayer, RemoteResult};
use memobuildd::cache::remote::settings::Endpoint;
use memobuildd::cache::remote::{
    L3, LayerSource, RemoteMode, RemoteOptions, RemoteSettings, Secret,
};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn curl(args: &[&str]) -> (String, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "curl {args:?}: {:?}",
        texts(&output)
    );
    texts(&output)
}

/// Polls `/status` until `done` holds, for at most 30 s.
fn wait_status(
    server: &TestCacheServer,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.status();
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: last status {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn action_result_naming(blobs: &[&[u8]]) -> reapi::ActionResult {
    reapi::ActionResult {
        output_files: blobs
            .iter()
            .enumerate()
            .map(|(i, b)| reapi::OutputFile {
                path: format!("out/{i}"),
                digest: Some(digest(b)),
                ..reapi::OutputFile::default()
            })
            .collect(),
        ..reapi::ActionResult::default()
    }
}

fn bgd(args: &[&str]) -> (bool, String, String) {
    let bgd = python_tool("bgd").expect("bgd: run .ci/install-deps (BuildGrid in .venv)");
    let output = Command::new(bgd).args(args).output().expect("run bgd");
    let (stdout, stderr) = texts(&output);
    (output.status.success(), stdout, stderr)
}

#[test]
fn buildgrid_cli_uploads_files_and_action_results_to_our_server() {
    let server = TestCacheServer::start(&[]);
    let remote = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let output = blob(300_000, 1);
    let file = dir.path().join("output.bin");
    std::fs::write(&file, &output).expect("write");
    let (ok, stdout, stderr) = bgd(&[
        "cas",
        "--remote",
        &remote,
        "upload-file",
        "--verify",
        file.to_str().expect("utf-8"),
    ]);
    assert!(ok && stdout.contains("Success"), "{stdout}{stderr}");
    let stored = server
        .store
        .join("cas")
        .join(&hex_sha256(&output)[..2])
        .join(hex_sha256(&output));
    assert_eq!(std::fs::read(&stored).expect("stored by name"), output);

    // `bgd actioncache update` reads the ActionResult from the CAS, then updates the cache.
    let result = action_result_naming(&[&output]).encode_to_vec();
    let result_file = dir.path().join("result.pb");
    std::fs::write(&result_file, &result).expect("write");
    let (ok, stdout, stderr) = bgd(&[
        "cas",
        "--remote",
        &remote,
        "upload-file",
        result_file.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{stdout}{stderr}");
    let action = format!("{}/11", hex_sha256(b"some action"));
    let result_digest = format!("{}/{}", hex_sha256(&result), result.len());
    let (ok, stdout, stderr) = bgd(&[
        "actioncache",
        "--remote",
        &remote,
        "update",
        &action,
        &result_digest,
    ]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = bgd(&["actioncache", "--remote", &remote, "get", "--json", &action]);
    assert!(
        ok && stdout.contains(&hex_sha256(&output)) && stdout.contains("out/0"),
        "{stdout}{stderr}"
    );
    let unknown = format!("{}/3", hex_sha256(b"never run"));
    let (_, stdout, stderr) = bgd(&["actioncache", "--remote", &remote, "get", &unknown]);
    assert!(
        format!("{stdout}{stderr}").contains("Miss"),
        "{stdout}{stderr}"
    );

    let status = server.status();
    assert_eq!(status["store"]["cas_entries"], 2, "{status}");
    assert_eq!(status["store"]["ac_entries"], 1, "{status}");
}

#[test]
fn curl_puts_and_gets_blobs_and_action_results_over_http() {
    let server = TestCacheServer::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = blob(3 << 20, 2);
    let file = dir.path().join("blob");
    std::fs::write(&file, &bytes).expect("write");
    let hash = hex_sha256(&bytes);
    let url = format!("{}/cas/{hash}", server.url());
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-T",
        file.to_str().expect("utf-8"),
        &url,
    ]);
    assert_eq!(code, "200");
    let back = dir.path().join("back");
    let (code, _) = curl(&[
        "-o",
        back.to_str().expect("utf-8"),
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!(code, "200");
    assert_eq!(
        std::fs::read(&back).expect("read"),
        bytes,
        "streamed back whole"
    );
    let (head, _) = curl(&["-I", &url]);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}", bytes.len())),
        "{head}"
    );

    // Bytes that do not match the name are refused; nothing under that name appears.
    let wrong = format!("{}/cas/{}", server.url(), hex_sha256(b"something else"));
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-T",
        file.to_str().expect("utf-8"),
        &wrong,
    ]);
    assert_eq!(code, "400");
    let (code, _) = curl(&["-o", "/dev/null", "-w", "%{http_code}", &wrong]);
    assert_eq!(code, "404");

    // The action cache under a prefix, as Bazel's --remote_cache=http://host/prefix does.
    let result = action_result_naming(&[&bytes]).encode_to_vec();
    let ac = format!("{}/team/ac/{}", server.url(), hex_sha256(b"action"));
    let result_file = dir.path().join("result");
    std::fs::write(&result_file, &result).expect("write");
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-T",
        result_file.to_str().expect("utf-8"),
        &ac,
    ]);
    assert_eq!(code, "200");
    let response = http(
        server.addr,
        "GET",
        &format!("/team/ac/{}", hex_sha256(b"action")),
        &[],
        b"",
    );
    assert_eq!((response.status, response.body), (200, result.clone()));
    let head = http(
        server.addr,
        "HEAD",
        &format!("/team/ac/{}", hex_sha256(b"action")),
        &[],
        b"",
    );
    assert_eq!(
        head.header("content-length"),
        Some(result.len().to_string().as_str())
    );
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").text();
    for needle in [
        "memobuild_cache_requests_total{kind=\"http_cas_put\",status=\"200\"} 1",
        "memobuild_cache_requests_total{kind=\"http_cas_put\",status=\"400\"} 1",
        "memobuild_cache_hits_total{kind=\"ac\"} 2",
        "memobuild_cache_store_entries{kind=\"cas\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    assert!(
        metrics.contains("memobuild_cache_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn eviction_keeps_the_store_under_budget_and_evicted_blobs_make_misses() {
    const BLOB: usize = 64 << 10;
    const BUDGET: u64 = 1 << 20;
    let server = TestCacheServer::start(&["--max-size", "1MiB"]);
    let mut cas = server.cas().await;
    let mut ac = server.action_cache().await;
    let upload = |bytes: Vec<u8>| reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(&bytes)),
            data: bytes,
            ..Default::default()
        }],
        ..Default::default()
    };
    let named = blob(BLOB, 1_000);
    let hot = blob(BLOB, 1_001);
    cas.batch_update_blobs(upload(named.clone()))
        .await
        .expect("named");
    cas.batch_update_blobs(upload(hot.clone()))
        .await
        .expect("hot");
    let action = digest(b"the action");
    let update = reapi::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(action_result_naming(&[&named])),
        ..Default::default()
    };
    ac.update_action_result(update.clone())
        .await
        .expect("update");
    let get = reapi::GetActionResultRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    ac.get_action_result(get.clone())
        .await
        .expect("a hit while its blob is there");

    // Twice the budget, in distinct blobs; the action result and the hot blob stay in use
    // (re-stored, and named in FindMissingBlobs) without touching the blob the result names.
    let mut written = 2 * BLOB as u64;
    let mut seed = 0;
    while written < 2 * BUDGET {
        std::thread::sleep(Duration::from_millis(3));
        cas.batch_update_blobs(upload(blob(BLOB, seed)))
            .await
            .expect("fill");
        seed += 1;
        written += BLOB as u64;
        let missing = cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: vec![digest(&hot)],
                ..Default::default()
            })
            .await
            .expect("find")
            .into_inner();
        assert!(
            missing.missing_blob_digests.is_empty(),
            "a blob in use was evicted"
        );
        ac.update_action_result(update.clone())
            .await
            .expect("refresh");
    }
    let status = wait_status(&server, "the store back under its budget", |s| {
        s["store"]["bytes"].as_u64().is_some_and(|b| b <= BUDGET)
    });
    assert!(status["store"]["evictions"].as_u64() > Some(0), "{status}");

    let missing = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest(&named), digest(&hot)],
            ..Default::default()
        })
        .await
        .expect("find")
        .into_inner();
    assert_eq!(
        missing.missing_blob_digests,
        vec![digest(&named)],
        "the oldest blob went, the hot one stayed"
    );
    let ac_file = server
        .store
        .join("ac")
        .join(&action.hash[..2])
        .join(&action.hash);
    assert!(ac_file.exists(), "the action result itself is still stored");
    let err = ac.get_action_result(get).await.expect_err("a miss");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let response = http(
        server.addr,
        "GET",
        &format!("/ac/{}", action.hash),
        &[],
        b"",
    );
    assert_eq!(response.status, 404, "a miss over HTTP too");

    let check = verify_store(&server.store);
    assert!(check.bad.is_empty(), "{check:?}");
    let status = server.status();
    assert_eq!(
        status["store"]["cas_entries"].as_u64(),
        Some(check.blobs as u64),
        "index = files: {status}"
    );
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("memobuild_cache_evictions_total"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("memobuild_cache_evictions_total 0\n"),
        "{metrics}"
    );
}

fn write_tokens(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        "# serve-cache tokens\nrw-secret-0123456789 read-write ci\nro-secret-0123456789 read-only laptops\n",
    )
    .expect("tokens");
    path
}

#[tokio::test]
async fn read_only_tokens_cannot_write_and_no_token_cannot_read() {
    let tokens_dir = tempfile::tempdir().expect("tempdir");
    let tokens = write_tokens(tokens_dir.path());
    let server = TestCacheServer::start(&["--auth", tokens.to_str().expect("utf-8")]);
    let bytes = b"guarded".to_vec();
    let path = format!("/cas/{}", hex_sha256(&bytes));
    let rw = ("Authorization", "Bearer rw-secret-0123456789");
    let ro = ("Authorization", "Bearer ro-secret-0123456789");

    assert_eq!(http(server.addr, "PUT", &path, &[], &bytes).status, 401);
    assert_eq!(http(server.addr, "PUT", &path, &[ro], &bytes).status, 403);
    assert_eq!(
        http(
            server.addr,
            "PUT",
            &path,
            &[("Authorization", "Bearer wrong")],
            &bytes
        )
        .status,
        401
    );
    assert_eq!(http(server.addr, "PUT", &path, &[rw], &bytes).status, 200);
    let denied = http(server.addr, "GET", &path, &[], b"");
    assert_eq!(denied.status, 401);
    assert!(
        denied
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic"))
    );
    assert_eq!(http(server.addr, "GET", "/status", &[], b"").status, 401);
    assert_eq!(http(server.addr, "GET", &path, &[ro], b"").body, bytes);
    // Basic auth, as HTTP-only clients send it: the password is the token.
    let (body, _) = curl(&[
        "-u",
        "anyone:ro-secret-0123456789",
        &format!("{}{path}", server.url()),
    ]);
    assert_eq!(body.as_bytes(), bytes);

    let mut cas = server.cas().await;
    let find = reapi::FindMissingBlobsRequest {
        blob_digests: vec![digest(&bytes)],
        ..Default::default()
    };
    let err = cas
        .find_missing_blobs(find.clone())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let found = cas
        .find_missing_blobs(with("ro-secret-0123456789", find))
        .await
        .expect("read-only reads")
        .into_inner();
    assert!(found.missing_blob_digests.is_empty());
    let other = b"not allowed".to_vec();
    let update = reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(&other)),
            data: other.clone(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = cas
        .batch_update_blobs(with("ro-secret-0123456789", update.clone()))
        .await
        .expect_err("read-only cannot write");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    cas.batch_update_blobs(with("rw-secret-0123456789", update))
        .await
        .expect("read-write writes");
    let status = http(server.addr, "GET", "/status", &[ro], b"");
    let status: serde_json::Value = serde_json::from_slice(&status.body).expect("json");
    assert_eq!(status["auth"], true);
    assert_eq!(status["store"]["cas_entries"], 2, "{status}");
}

#[test]
fn kill_9_during_uploads_leaves_only_verified_blobs_and_a_consistent_index() {
    let mut server = TestCacheServer::start(&[]);
    let mut completed: Vec<String> = Vec::new();
    for round in 0..10u64 {
        // Eight clients upload at once; the server dies in the middle.
        let (done_tx, done_rx) = mpsc::channel();
        let mut clients = Vec::new();
        for client in 0..8u64 {
            let addr = server.addr;
            let done_tx = done_tx.clone();
            clients.push(std::thread::spawn(move || {
                // Small blobs finish; big, paced ones are cut off by the kill.
                let len = if client % 2 == 0 { 64 << 10 } else { 4 << 20 };
                let bytes = blob(len, round * 100 + client);
                let hash = hex_sha256(&bytes);
                let Ok(mut stream) = TcpStream::connect(addr) else {
                    return;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let head = format!(
                    "PUT /cas/{hash} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    bytes.len()
                );
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let pace = if client % 2 == 0 { 0 } else { 5 };
                for chunk in bytes.chunks(256 << 10) {
                    if stream.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(pace));
                }
                let mut response = String::new();
                if stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200") {
                    let _ = done_tx.send(hash);
                }
            }));
        }
        drop(done_tx);
        std::thread::sleep(Duration::from_millis(100 + 20 * round));
        server.kill();
        for client in clients {
            client.join().expect("client thread");
        }
        completed.extend(done_rx.try_iter());

        let check = verify_store(&server.store);
        assert!(
            check.bad.is_empty(),
            "round {round}: blobs not matching their digest: {check:?}"
        );
        server.launch();
        let check = verify_store(&server.store);
        assert_eq!(
            check.temp_files, 0,
            "round {round}: temp files left after restart"
        );
        let status = server.status();
        assert_eq!(
            status["store"]["cas_entries"].as_u64(),
            Some(check.blobs as u64),
            "round {round}: index and files agree: {status}"
        );
        for hash in &completed {
            let response = http(server.addr, "HEAD", &format!("/cas/{hash}"), &[], b"");
            assert_eq!(
                response.status, 200,
                "round {round}: an acknowledged upload survived: {hash}"
            );
        }
    }
    assert!(
        !completed.is_empty(),
        "some uploads completed between the kills"
    );
    // And once more with the index itself lost: rebuilt from the files.
    let before = server.status()["store"]["cas_entries"].clone();
    server.kill();
    for name in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = std::fs::remove_file(server.store.join(name));
    }
    server.launch();
    assert_eq!(server.status()["store"]["cas_entries"], before);
}

#[tokio::test]
async fn concurrent_uploads_of_one_blob_and_abandoned_uploads() {
    let server = TestCacheServer::start(&[]);
    let bytes = blob(2 << 20, 7);
    let d = digest(&bytes);
    let mut writers = Vec::new();
    for i in 0..6 {
        let addr = server.addr;
        let bytes = bytes.clone();
        let hash = d.hash.clone();
        writers.push(std::thread::spawn(move || {
            if i % 2 == 0 {
                http(addr, "PUT", &format!("/cas/{hash}"), &[], &bytes).status
            } else {
                200
            }
        }));
    }
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut client = server.bytestream().await;
        let bytes = bytes.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let resource = format!("uploads/{i}-uuid/blobs/{}/{}", d.hash, d.size_bytes);
            let requests = write_requests(&resource, &bytes, 256 << 10);
            client
                .write(tokio_stream(requests))
                .await
                .map(|r| r.into_inner().committed_size)
        }));
    }
    for writer in writers {
        assert_eq!(writer.join().expect("writer"), 200);
    }
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("write"), d.size_bytes);
    }
    // Read back over ByteStream from an offset, with a limit.
    let mut client = server.bytestream().await;
    let mut stream = client
        .read(bs::ReadRequest {
            resource_name: format!("main/blobs/{}/{}", d.hash, d.size_bytes),
            read_offset: 1000,
            read_limit: 500_000,
        })
        .await
        .expect("read")
        .into_inner();
    let mut back = Vec::new();
    while let Some(message) = stream.message().await.expect("message") {
        back.extend_from_slice(&message.data);
    }
    assert_eq!(back, bytes[1000..501_000]);

    // A client that goes away mid-body leaves nothing, not even a temp file.
    let other = blob(1 << 20, 8);
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    let head = format!(
        "PUT /cas/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        hex_sha256(&other),
        other.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&other[..300_000]).expect("part");
    drop(stream);
    // A ByteStream write that ends without finish_write stores nothing either.
    let od = digest(&other);
    let err = client
        .write(tokio_stream(vec![bs::WriteRequest {
            resource_name: format!("uploads/x/blobs/{}/{}", od.hash, od.size_bytes),
            write_offset: 0,
            finish_write: false,
            data: other[..1000].to_vec(),
        }]))
        .await
        .expect_err("unfinished");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let status = wait_status(&server, "the abandoned upload cleaned up", |_| {
        verify_store(&server.store).temp_files == 0
    });
    assert_eq!(status["store"]["cas_entries"], 1, "{status}");
    let check = verify_store(&server.store);
    assert_eq!((check.blobs, check.bad.len()), (1, 0));
}

/// A stream of messages for a client-streaming call.
fn tokio_stream<T: Send + 'static>(
    items: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> {
    tonic::codegen::tokio_stream::iter(items)
}

#[test]
fn disk_full_refuses_uploads_with_507_and_keeps_serving_reads() {
    if !privileged("cacheserver::disk_full_refuses_uploads_with_507_and_keeps_serving_reads") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("mbfull")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("fs.img");
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).expect("mountpoint");
    let file = std::fs::File::create(&image).expect("image");
    file.set_len(24 << 20).expect("size");
    let run = |cmd: &mut Command| {
        let output = cmd.output().expect("run");
        assert!(output.status.success(), "{cmd:?}: {:?}", texts(&output));
    };
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&image));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mount));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mount);
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = TestCacheServer::start_at(server_dir, mount.join("store"), &["--max-size", "1G"]);

    let first = blob(1 << 20, 1);
    let path = |b: &[u8]| format!("/cas/{}", hex_sha256(b));
    assert_eq!(
        http(server.addr, "PUT", &path(&first), &[], &first).status,
        200
    );
    let mut refused = None;
    for seed in 2..64 {
        let bytes = blob(2 << 20, seed);
        let status = http(server.addr, "PUT", &path(&bytes), &[], &bytes).status;
        if status != 200 {
            refused = Some(status);
            break;
        }
    }
    assert_eq!(refused, Some(507), "uploads refused once the disk is full");
    let response = http(server.addr, "GET", &path(&first), &[], b"");
    assert_eq!(
        (response.status, response.body == first),
        (200, true),
        "reads keep working"
    );
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let mut cas = server.cas().await;
            let big = blob(3 << 20, 99);
            let response = cas
                .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                    requests: vec![reapi::batch_update_blobs_request::Request {
                        digest: Some(digest(&big)),
                        data: big,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .expect("batch answered")
                .into_inner();
            let code = response.responses[0].status.as_ref().map(|s| s.code);
            assert_eq!(
                code,
                Some(tonic::Code::ResourceExhausted as i32),
                "{response:?}"
            );
        });
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("status=\"507\""), "{metrics}");
    let check = verify_store(&server.store);
    assert!(check.bad.is_empty(), "{check:?}");
    drop(server);
}

#[tokio::test]
async fn malformed_requests_cost_only_their_connection() {
    let server = TestCacheServer::start(&[]);
    // Garbage instead of HTTP: the connection is closed.
    for garbage in [
        &b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"GET /status HTTP/1.1\r\nHost: x\r\nX-Bad: \x00\x01\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream.write_all(garbage).expect("send");
        let mut answer = Vec::new();
        // The server answers with an error or nothing, and closes: read reaches EOF.
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        // Nothing, or an error status: never a success.
        assert!(!text.starts_with("HTTP/1.1 2"), "{text}");
    }
    // Oversized headers.
    let huge = "x".repeat(200 << 10);
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = stream
        .write_all(format!("GET /status HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n").as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // A gRPC call whose message is not protobuf: an error status, not a crash.
    let mut cas = server.cas().await;
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    raw.ready().await.expect("ready");
    let err = raw
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0x0f, 0x01]),
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
                .parse()
                .expect("path"),
            RawCodec,
        )
        .await
        .expect_err("undecodable");
    assert_ne!(err.code(), tonic::Code::Ok);
    // Digests that are not SHA-256, and oversized batches, are INVALID_ARGUMENT.
    let err = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![reapi::Digest {
                hash: "abc".into(),
                size_bytes: 1,
            }],
            ..Default::default()
        })
        .await
        .expect_err("bad digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The server still serves everyone.
    let ok = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest(b"x")],
            ..Default::default()
        })
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(ok.missing_blob_digests.len(), 1);
    assert_eq!(server.status()["store"]["bytes"], 0);
}

/// `message` with `Authorization: Bearer token` in its metadata.
fn with<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// Sends bytes as they are, so the server sees a message that is not protobuf.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        Self
    }
    fn decoder(&mut self) -> Self::Decoder {
        Self
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// A webhook receiver on 127.0.0.1: answers 500 to the first request and 200 after, and
/// hands each request's headers and body to the test.
/// A request's lower-cased headers and its body.
type Received = (Vec<(String, String)>, Vec<u8>);

fn webhook_receiver() -> (u16, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(stream);
            let mut headers = Vec::new();
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let mut stream = reader.into_inner();
            let _ = stream.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            if tx.send((headers, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[test]
fn build_reports_feed_analytics_and_signed_webhooks_with_retries() {
    let (port, received) = webhook_receiver();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "webhook-secret\n").expect("secret");
    let tokens = write_tokens(secret_dir.path());
    let hook = format!("http://127.0.0.1:{port}/hook");
    let config = secret_dir.path().join("cache.toml");
    std::fs::write(
        &config,
        format!(
            "[serve_cache]\nwebhooks = [\"{hook}\"]\nwebhook_secret_file = \"{}\"\nauth_file = \"{}\"\n",
            secret.display(),
            tokens.display()
        ),
    )
    .expect("config");
    let server = TestCacheServer::start(&["--config", config.to_str().expect("utf-8")]);
    let rw = ("Authorization", "Bearer rw-secret-0123456789");
    let report = br#"{"client": "ignored-with-auth", "build_id": "b-1", "duration_ms": 1500,
        "steps": 10, "cached_steps": 7, "executed_steps": 3, "remote_hits": 6,
        "remote_misses": 1, "bytes_downloaded": 1000, "bytes_uploaded": 200, "success": true}"#;
    let started = Instant::now();
    let response = http(
        server.addr,
        "POST",
        "/v1/builds",
        &[rw, ("Content-Type", "application/json")],
        report,
    );
    assert_eq!(response.status, 201, "{}", response.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reporting never waits for webhooks"
    );
    assert_eq!(
        http(
            server.addr,
            "POST",
            "/v1/builds",
            &[rw],
            b"{\"steps\": 1, \"cached_steps\": 5}"
        )
        .status,
        400
    );
    assert_eq!(
        http(server.addr, "POST", "/v1/builds", &[], report).status,
        401
    );

    // The first delivery gets a 500; the retry arrives, signed over the raw body.
    let mut deliveries = Vec::new();
    for _ in 0..2 {
        deliveries.push(
            received
                .recv_timeout(Duration::from_secs(30))
                .expect("a webhook delivery"),
        );
    }
    for (headers, body) in &deliveries {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("x-memobuild-event").as_deref(),
            Some("build.completed")
        );
        let signature = header("x-memobuild-signature").expect("signed");
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"webhook-secret").expect("key");
        mac.update(body);
        let expected =
            hex::decode(signature.strip_prefix("sha256=").expect("sha256=")).expect("hex");
        mac.verify_slice(&expected)
            .expect("a valid HMAC-SHA256 signature");
        let summary: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert_eq!(
            summary["client"], "ci",
            "the token's name, not the claimed one"
        );
        assert_eq!(summary["build"]["cached_steps"], 7);
    }
    let clients = http(server.addr, "GET", "/v1/clients", &[rw], b"");
    let clients: serde_json::Value = serde_json::from_slice(&clients.body).expect("json");
    let ci = &clients["clients"][0];
    assert_eq!(
        (
            ci["client"].as_str(),
            ci["builds"].as_u64(),
            ci["steps"].as_u64()
        ),
        (Some("ci"), Some(1), Some(10)),
        "{clients}"
    );
    assert!((ci["hit_rate"].as_f64().expect("rate") - 0.7).abs() < 1e-9);
    let metrics = http(server.addr, "GET", "/metrics", &[rw], b"").text();
    assert!(
        metrics.contains("memobuild_cache_webhook_deliveries_total{result=\"delivered\"} 1"),
        "{metrics}"
    );
}

#[test]
fn tls_serves_http_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(output.status.success(), "{:?}", texts(&output));
    let mut server = TestCacheServer::start(&[
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ]);
    let url = format!("https://{}/status", server.addr);
    let (body, _) = curl(&["--cacert", cert.to_str().expect("utf-8"), &url]);
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status["tls"], true);
    let (body, _) = curl(&["--http2", "--cacert", cert.to_str().expect("utf-8"), &url]);
    assert!(body.contains("\"tls\":true"));
    let exit = server.terminate();
    assert!(exit.success(), "{exit:?}\n{}", server.log_text());
}

#[test]
fn sigterm_lets_an_upload_in_flight_finish() {
    let mut server = TestCacheServer::start(&[]);
    let bytes = blob(2 << 20, 31);
    let hash = hex_sha256(&bytes);
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "PUT /cas/{hash} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&bytes[..1 << 20]).expect("first half");
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.pid();
    memobuild_tests::signal(pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        memobuild_tests::process_exists(pid),
        "the server waits for the upload in flight"
    );
    stream.write_all(&bytes[1 << 20..]).expect("second half");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let exit = server.terminate();
    assert!(exit.success(), "{exit:?}\n{}", server.log_text());
    let check = verify_store(&server.store);
    assert_eq!((check.blobs, check.bad.len()), (1, 0), "{check:?}");
}

/// Layer tars in a directory, by diff-id, as a machine's store hands them to L3 uploads.
#[derive(Debug)]
struct DirLayers(tempfile::TempDir);

impl DirLayers {
    fn add(&self, bytes: &[u8]) -> RemoteLayer {
        let diff_id = memobuildd::store::Digest::parse(&format!("sha256:{}", hex_sha256(bytes)))
            .expect("digest");
        std::fs::write(self.0.path().join(diff_id.hex()), bytes).expect("write layer");
        RemoteLayer {
            diff_id,
            size: bytes.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            content_id: [7; 32],
        }
    }
}

impl LayerSource for DirLayers {
    fn open(&self, layer: &RemoteLayer) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(std::fs::File::open(
            self.0.path().join(layer.diff_id.hex()),
        )?))
    }
}

fn l3_client(url: &str, mode: RemoteMode, layers: DirLayers) -> L3 {
    let (endpoint, auth) = Endpoint::parse(url).expect("url");
    let settings = RemoteSettings {
        endpoint,
        mode,
        auth,
        ca_file: None,
        secret: Some(Secret::new("team")),
    };
    L3::connect(
        &settings,
        RemoteOptions::default(),
        std::sync::Arc::new(layers) as std::sync::Arc<dyn LayerSource>,
    )
    .expect("client")
    .expect("not off")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemons_l3_client_shares_results_through_serve_cache_over_grpc_and_http() {
    let server = TestCacheServer::start(&[]);
    for (n, url) in [
        format!("grpc://{}", server.addr),
        format!("{}/team-prefix", server.url()),
    ]
    .into_iter()
    .enumerate()
    {
        let layers = DirLayers(tempfile::tempdir().expect("tempdir"));
        let small = layers.add(format!("a small layer {n}").as_bytes());
        // Past the 4 MiB batch limit: ByteStream over gRPC, a streamed PUT over HTTP.
        let big = layers.add(&blob(5 << 20, 40 + n as u64));
        let result = RemoteResult {
            layers: vec![small, big],
        };
        let writer = l3_client(&url, RemoteMode::ReadWrite, layers);
        let key = memobuildd::cache::tier::suite::keys(u8::try_from(n).expect("n"))(1);
        writer.store(&key, &result);
        assert!(
            writer.uploaded(Duration::from_secs(120)).await,
            "{url}: uploads finish"
        );

        // Another machine: nothing local.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let reader = l3_client(
            &url,
            RemoteMode::ReadOnly,
            DirLayers(tempfile::tempdir().expect("tempdir")),
        );
        let hit = reader.lookup(&key).await.expect("a hit on another machine");
        assert_eq!(hit, result, "{url}");
        for layer in &hit.layers {
            let path = elsewhere.path().join(layer.diff_id.hex());
            let file = std::fs::File::create(&path).expect("create");
            reader
                .fetch_layer(layer, file)
                .await
                .expect("layer arrives");
            assert_eq!(
                hex_sha256(&std::fs::read(&path).expect("read")),
                layer.diff_id.hex()
            );
        }
        let status = reader.status();
        assert_eq!(status.hits, 1, "{url}: {status:?}");
    }
    let check = verify_store(&server.store);
    assert!(check.bad.is_empty() && check.blobs >= 4, "{check:?}");
}
