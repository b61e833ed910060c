//! The L3 client against real remote caches: BuildGrid (REAPI over gRPC) and nginx with WebDAV
//! (Bazel's HTTP cache). Round trips of entries and blobs (small, and beyond the batch limit),
//! the tier suite, corruption on the server, entries signed with another secret, a server
//! killed mid-operation, read-only mode, and a 200 MB blob through ByteStream in bounded
//! memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memobuild_tests::buildgrid::{BuildGridOptions, TestBuildGrid, jwt};
use memobuild_tests::nginx::{NginxAuth, NginxOptions, TestNginx};
use memobuildd::cache::remote::mapping::{self, RemoteLayer, RemoteResult};
use memobuildd::cache::remote::settings::Endpoint;
use memobuildd::cache::remote::{
    Auth, L3, LayerSource, RemoteEvent, RemoteMode, RemoteOptions, RemoteSettings, Secret,
};
use memobuildd::cache::tier::suite;
use memobuildd::cache::{L1, Tier, Tiered};
use memobuildd::store::Digest;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

const SETTLE: Duration = Duration::from_secs(120);

/// Layer tars in a directory, by diff-id: what a machine's store would hand uploads.
#[derive(Debug)]
struct DirLayers(TempDir);

impl DirLayers {
    fn new() -> Arc<Self> {
        Arc::new(Self(tempfile::tempdir().expect("tempdir")))
    }

    fn path(&self, diff_id: &Digest) -> PathBuf {
        self.0.path().join(diff_id.hex())
    }

    fn add(&self, bytes: &[u8]) -> RemoteLayer {
        let diff_id = Digest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
            .expect("digest");
        std::fs::write(self.path(&diff_id), bytes).expect("write layer");
        RemoteLayer {
            diff_id,
            size: bytes.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            content_id: [7; 32],
        }
    }

    /// A layer of `size` pseudo-random bytes written in 1 MiB pieces, never whole in memory.
    fn add_big(&self, size: u64, seed: u64) -> RemoteLayer {
        let temp = self.0.path().join("writing");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&temp).expect("create"));
        let mut hasher = Sha256::new();
        let mut state = seed | 1;
        let mut piece = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for word in piece.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
            }
            let n = left.min(piece.len() as u64) as usize;
            file.write_all(&piece[..n]).expect("write");
            hasher.update(&piece[..n]);
            left -= n as u64;
        }
        file.flush().expect("flush");
        let diff_id =
            Digest::parse(&format!("sha256:{}", hex::encode(hasher.finalize()))).expect("digest");
        std::fs::rename(&temp, self.path(&diff_id)).expect("rename");
        RemoteLayer {
            diff_id,
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            content_id: [8; 32],
        }
    }
}

impl LayerSource for DirLayers {
    fn open(&self, layer: &RemoteLayer) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(self.path(&layer.diff_id))?))
    }
}

/// The server under test.
enum Server {
    BuildGrid(TestBuildGrid),
    Nginx(TestNginx),
}

impl Server {
    fn buildgrid(test: &str) -> Option<Self> {
        TestBuildGrid::start(test).map(Self::BuildGrid)
    }

    fn nginx(test: &str) -> Option<Self> {
        TestNginx::start(test).map(Self::Nginx)
    }

    fn url(&self) -> String {
        match self {
            Self::BuildGrid(server) => server.url("team"),
            Self::Nginx(server) => server.url(),
        }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        match self {
            Self::BuildGrid(server) => server.blob_path(digest),
            Self::Nginx(server) => server.blob_path(digest),
        }
    }

    /// Files the server stores (blobs and entries).
    fn stored_files(&self) -> usize {
        let root = match self {
            Self::BuildGrid(server) => server.dir.path().join("storage"),
            Self::Nginx(server) => server.dir.path().join("www/cache"),
        };
        count_files(&root)
    }

    fn kill(&mut self) {
        match self {
            Self::BuildGrid(server) => server.kill(),
            Self::Nginx(server) => server.kill(),
        }
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    count_files(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

fn options() -> RemoteOptions {
    RemoteOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(20),
        retry_after: Duration::from_secs(1),
        ..RemoteOptions::default()
    }
}

fn l3(server: &Server, mode: RemoteMode, secret: Option<&str>, layers: &Arc<DirLayers>) -> L3 {
    let (endpoint, auth) = Endpoint::parse(&server.url()).expect("url");
    let settings = RemoteSettings {
        endpoint,
        mode,
        auth,
        ca_file: None,
        secret: secret.map(Secret::new),
    };
    L3::connect(
        &settings,
        options(),
        Arc::clone(layers) as Arc<dyn LayerSource>,
    )
    .expect("client")
    .expect("not off")
}

async fn settle(l3: &L3) {
    assert!(l3.uploaded(SETTLE).await, "uploads did not finish");
}

/// A small layer, one bigger than BuildGrid's 4 MB batch limit, and a result of each.
fn results(layers: &DirLayers) -> Vec<RemoteResult> {
    let small = layers.add(b"a small layer tar");
    let big = layers.add_big(5 << 20, 7);
    vec![
        RemoteResult { layers: vec![] },
        RemoteResult {
            layers: vec![small.clone()],
        },
        RemoteResult {
            layers: vec![small, big],
        },
    ]
}

async fn round_trip(server: Server) {
    let layers = DirLayers::new();
    let values = results(&layers);
    let writer = l3(&server, RemoteMode::ReadWrite, Some("team"), &layers);
    suite::check(
        &writer,
        &values,
        async || settle(&writer).await,
        suite::keys(1),
    )
    .await;
    let status = writer.status();
    assert_eq!((status.uploads_failed, status.errors), (0, 0), "{status:?}");
    assert!(status.bytes_up > 5 << 20, "{status:?}");
    let tiered = Tiered::new(vec![
        Arc::new(L1::<RemoteResult>::new(1 << 20)) as Arc<dyn Tier<RemoteResult>>,
        Arc::new(writer.clone()),
    ]);
    suite::check(
        &tiered,
        &values,
        async || settle(&writer).await,
        suite::keys(3),
    )
    .await;

    // Another machine: same secret, nothing local.
    let elsewhere = DirLayers::new();
    let reader = l3(&server, RemoteMode::ReadOnly, Some("team"), &elsewhere);
    let key = suite::keys(2)(1);
    writer.store(&key, &values[2]);
    settle(&writer).await;
    let hit = reader.lookup(&key).await.expect("a hit on another machine");
    assert_eq!(hit, values[2]);
    for layer in &hit.layers {
        let path = elsewhere.path(&layer.diff_id);
        let file = std::fs::File::create(&path).expect("create");
        reader
            .fetch_layer(layer, file)
            .await
            .expect("layer arrives");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(hex::encode(Sha256::digest(&bytes)), layer.diff_id.hex());
    }
    let status = reader.status();
    assert_eq!((status.hits, status.bytes_up), (1, 0), "{status:?}");
    assert!(status.healthy && status.bytes_down > 5 << 20, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_round_trips_entries_and_blobs_small_and_streamed() {
    let Some(server) = Server::buildgrid("remote::buildgrid_round_trips") else {
        return;
    };
    round_trip(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_round_trips_entries_and_blobs() {
    let Some(server) = Server::nginx("remote::nginx_round_trips") else {
        return;
    };
    round_trip(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_instances_are_separate_caches() {
    let Some(Server::BuildGrid(server)) = Server::buildgrid("remote::buildgrid_instances") else {
        return;
    };
    let layers = DirLayers::new();
    let result = RemoteResult {
        layers: vec![layers.add(b"instance layer")],
    };
    let at = |instance: &str| {
        let (endpoint, _) = Endpoint::parse(&server.url(instance)).expect("url");
        let settings = RemoteSettings {
            endpoint,
            mode: RemoteMode::ReadWrite,
            auth: None,
            ca_file: None,
            secret: None,
        };
        L3::connect(
            &settings,
            options(),
            Arc::clone(&layers) as Arc<dyn LayerSource>,
        )
        .expect("client")
        .expect("on")
    };
    let team = at("team");
    team.store(&[9; 32], &result);
    settle(&team).await;
    assert_eq!(team.lookup(&[9; 32]).await, Some(result));
    assert_eq!(at("").lookup(&[9; 32]).await, None, "the default instance");
}

/// A client of `url` with these credentials and CA (credentials in the URL count too).
fn client(url: &str, auth: Option<Auth>, ca: Option<&Path>, layers: &Arc<DirLayers>) -> L3 {
    let (endpoint, url_auth) = Endpoint::parse(url).expect("url");
    let settings = RemoteSettings {
        endpoint,
        mode: RemoteMode::ReadWrite,
        auth: auth.or(url_auth),
        ca_file: ca.map(Path::to_owned),
        secret: None,
    };
    L3::connect(
        &settings,
        options(),
        Arc::clone(layers) as Arc<dyn LayerSource>,
    )
    .expect("client")
    .expect("on")
}

/// A client without the right credentials or CA gets nothing in or out (errors, not
/// crashes); one with them round-trips an entry and its layer.
async fn only_trusted_and_authorized_clients_get_through(
    refused: &[(&str, L3)],
    allowed: &L3,
    layers: &DirLayers,
) {
    let result = RemoteResult {
        layers: vec![layers.add(b"a layer behind TLS and auth")],
    };
    for (why, client) in refused {
        client.store(&[1; 32], &result);
        settle(client).await;
        assert_eq!(client.lookup(&[1; 32]).await, None, "{why}");
        let status = client.status();
        assert!(
            status.uploads_failed == 1 && status.errors > 0,
            "{why}: {status:?}"
        );
    }
    allowed.store(&[1; 32], &result);
    settle(allowed).await;
    assert_eq!(allowed.status().uploads_done, 1, "{:?}", allowed.status());
    assert_eq!(allowed.lookup(&[1; 32]).await, Some(result.clone()));
    assert!(
        allowed
            .fetch_layer(&result.layers[0], Vec::new())
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_over_https_with_an_extra_ca_and_basic_or_bearer_auth() {
    let basic = NginxOptions {
        tls: true,
        auth: Some(NginxAuth::Basic {
            user: "ci".into(),
            password: "s3cret".into(),
        }),
    };
    let Some(server) = TestNginx::start_with("remote::nginx_https", &basic) else {
        return;
    };
    let layers = DirLayers::new();
    let ca = server.ca.as_deref();
    let url = server.url();
    let with_password = url.replace("https://", "https://ci:s3cret@");
    only_trusted_and_authorized_clients_get_through(
        &[
            ("no credentials", client(&url, None, ca, &layers)),
            (
                "wrong password",
                client(
                    &url.replace("https://", "https://ci:nope@"),
                    None,
                    ca,
                    &layers,
                ),
            ),
            ("an unknown CA", client(&with_password, None, None, &layers)),
        ],
        &client(&with_password, None, ca, &layers),
        &layers,
    )
    .await;

    let bearer = NginxOptions {
        tls: false,
        auth: Some(NginxAuth::Bearer("t0ken".into())),
    };
    let Some(server) = TestNginx::start_with("remote::nginx_bearer", &bearer) else {
        return;
    };
    let token = |t: &str| Some(Auth::Bearer(Secret::new(t)));
    only_trusted_and_authorized_clients_get_through(
        &[(
            "wrong token",
            client(&server.url(), token("other"), None, &layers),
        )],
        &client(&server.url(), token("t0ken"), None, &layers),
        &layers,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_over_grpcs_with_an_extra_ca_and_a_bearer_token() {
    let options = BuildGridOptions {
        tls: true,
        jwt_secret: Some("bgd jwt secret".into()),
    };
    let Some(server) = TestBuildGrid::start_with("remote::buildgrid_grpcs", &options) else {
        return;
    };
    let layers = DirLayers::new();
    let ca = server.ca.as_deref();
    let url = server.url("team");
    let token = Some(Auth::Bearer(Secret::new(jwt("bgd jwt secret"))));
    only_trusted_and_authorized_clients_get_through(
        &[
            ("no token", client(&url, None, ca, &layers)),
            (
                "a token signed otherwise",
                client(
                    &url,
                    Some(Auth::Bearer(Secret::new(jwt("other")))),
                    ca,
                    &layers,
                ),
            ),
            ("an unknown CA", client(&url, token.clone(), None, &layers)),
        ],
        &client(&url, token, ca, &layers),
        &layers,
    )
    .await;
}

async fn corruption_is_detected(server: Server) {
    let layers = DirLayers::new();
    let values = results(&layers);
    let l3 = l3(&server, RemoteMode::ReadWrite, None, &layers);
    l3.store(&[1; 32], &values[2]);
    settle(&l3).await;
    let mut events = l3.events();
    for layer in &values[2].layers {
        let path = server.blob_path(&layer.diff_id);
        let mut bytes = std::fs::read(&path).expect("the server's copy");
        bytes[layer.size as usize / 2] ^= 0x40;
        std::fs::write(&path, bytes).expect("corrupt it");
        assert!(l3.fetch_layer(layer, Vec::new()).await.is_none());
    }
    assert_eq!(l3.status().corrupt_blobs, 2);
    assert!(matches!(
        events.recv().await,
        Ok(RemoteEvent::CorruptBlob { .. })
    ));

    let action = mapping::action_digest(&[1; 32]);
    let entry = l3
        .remote()
        .get_action(&action)
        .await
        .expect("get")
        .expect("entry");
    let result_blob = mapping::result_blob_of(&entry).expect("ours");
    let path = server.blob_path(&result_blob.digest);
    let mut bytes = std::fs::read(&path).expect("result blob");
    *bytes.last_mut().expect("bytes") ^= 1;
    std::fs::write(&path, bytes).expect("corrupt it");
    assert_eq!(l3.lookup(&[1; 32]).await, None);
    assert_eq!(l3.status().corrupt_blobs, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_blobs_corrupted_on_the_server_are_detected() {
    if let Some(server) = Server::buildgrid("remote::buildgrid_corruption") {
        corruption_is_detected(server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_blobs_corrupted_on_the_server_are_detected() {
    if let Some(server) = Server::nginx("remote::nginx_corruption") {
        corruption_is_detected(server).await;
    }
}

async fn foreign_signatures_are_refused(server: Server) {
    let layers = DirLayers::new();
    let result = RemoteResult {
        layers: vec![layers.add(b"signed layer")],
    };
    let theirs = l3(
        &server,
        RemoteMode::ReadWrite,
        Some("their secret"),
        &layers,
    );
    theirs.store(&[1; 32], &result);
    settle(&theirs).await;
    let ours = l3(&server, RemoteMode::ReadWrite, Some("our secret"), &layers);
    let mut events = ours.events();
    assert_eq!(ours.lookup(&[1; 32]).await, None);
    assert_eq!(ours.status().bad_signatures, 1);
    assert!(matches!(
        events.recv().await,
        Ok(RemoteEvent::BadSignature { .. })
    ));
    let same = l3(&server, RemoteMode::ReadOnly, Some("their secret"), &layers);
    assert_eq!(same.lookup(&[1; 32]).await, Some(result));
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_entries_signed_with_another_secret_are_not_used() {
    if let Some(server) = Server::buildgrid("remote::buildgrid_signatures") {
        foreign_signatures_are_refused(server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_entries_signed_with_another_secret_are_not_used() {
    if let Some(server) = Server::nginx("remote::nginx_signatures") {
        foreign_signatures_are_refused(server).await;
    }
}

async fn a_killed_server_becomes_misses(mut server: Server) {
    let layers = DirLayers::new();
    let small = RemoteResult {
        layers: vec![layers.add(b"before the crash")],
    };
    let l3 = l3(&server, RemoteMode::ReadWrite, None, &layers);
    l3.store(&[1; 32], &small);
    settle(&l3).await;
    assert_eq!(l3.lookup(&[1; 32]).await, Some(small));

    // Killed while a 64 MB upload streams.
    let big = RemoteResult {
        layers: vec![layers.add_big(64 << 20, 3)],
    };
    let mut events = l3.events();
    l3.store(&[2; 32], &big);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    settle(&l3).await;
    assert_eq!(l3.status().uploads_failed, 1, "{:?}", l3.status());

    let started = Instant::now();
    for key in 0..10u8 {
        assert_eq!(l3.lookup(&[key; 32]).await, None, "errors are misses");
    }
    let status = l3.status();
    assert!(!status.healthy, "the breaker opened: {status:?}");
    assert!(status.last_error.is_some(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "misses are fast once open: {:?}",
        started.elapsed()
    );
    let mut warnings = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, RemoteEvent::Unavailable { .. }) {
            warnings += 1;
        }
    }
    assert_eq!(warnings, 1, "one warning");
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_killed_mid_upload_turns_into_misses_and_opens_the_breaker() {
    if let Some(server) = Server::buildgrid("remote::buildgrid_killed") {
        a_killed_server_becomes_misses(server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_killed_mid_upload_turns_into_misses_and_opens_the_breaker() {
    if let Some(server) = Server::nginx("remote::nginx_killed") {
        a_killed_server_becomes_misses(server).await;
    }
}

/// A layer whose local copy changed after its diff-id was taken: the upload stops before its
/// end, so the server never stores it under the old name, and no entry names it.
async fn a_changed_local_copy_is_not_published(server: Server) {
    let layers = DirLayers::new();
    let small = layers.add(b"small layer, soon changed");
    let big = layers.add_big(5 << 20, 5);
    for layer in [&small, &big] {
        let path = layers.path(&layer.diff_id);
        let mut bytes = std::fs::read(&path).expect("layer");
        bytes[layer.size as usize / 2] ^= 1;
        std::fs::write(&path, bytes).expect("change it");
    }
    let l3 = l3(&server, RemoteMode::ReadWrite, None, &layers);
    for (key, layer) in [small, big].iter().enumerate() {
        let result = RemoteResult {
            layers: vec![layer.clone()],
        };
        l3.store(&[key as u8; 32], &result);
        settle(&l3).await;
        assert!(!server.blob_path(&layer.diff_id).exists(), "{layer:?}");
        assert_eq!(l3.lookup(&[key as u8; 32]).await, None);
    }
    let status = l3.status();
    assert_eq!(
        (status.uploads_done, status.uploads_failed),
        (0, 2),
        "{status:?}"
    );
    assert!(status.healthy, "a local problem is no outage: {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_never_gets_a_changed_local_copy() {
    if let Some(server) = Server::buildgrid("remote::buildgrid_changed_copy") {
        a_changed_local_copy_is_not_published(server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_never_gets_a_changed_local_copy() {
    if let Some(server) = Server::nginx("remote::nginx_changed_copy") {
        a_changed_local_copy_is_not_published(server).await;
    }
}

async fn read_only_uploads_nothing(server: Server) {
    let before = server.stored_files();
    let layers = DirLayers::new();
    let values = results(&layers);
    let l3 = l3(&server, RemoteMode::ReadOnly, None, &layers);
    for (i, value) in values.iter().enumerate() {
        l3.store(&[i as u8; 32], value);
    }
    settle(&l3).await;
    assert_eq!(l3.lookup(&[2; 32]).await, None);
    assert_eq!(server.stored_files(), before);
    assert_eq!(l3.status().bytes_up, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_read_only_uploads_nothing() {
    if let Some(server) = Server::buildgrid("remote::buildgrid_read_only") {
        read_only_uploads_nothing(server).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_read_only_uploads_nothing() {
    if let Some(server) = Server::nginx("remote::nginx_read_only") {
        read_only_uploads_nothing(server).await;
    }
}

/// Resident set of this process, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS")
        * 1024
}

/// Runs `work` while sampling RSS; returns its output and the peak growth over the start.
async fn peak_rss_growth<T>(work: impl Future<Output = T>) -> (T, u64) {
    let start = rss_bytes();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let out = work.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    (out, peak.saturating_sub(start))
}

#[tokio::test(flavor = "multi_thread")]
async fn buildgrid_streams_a_200_mb_blob_both_ways_in_bounded_memory() {
    let Some(server) = Server::buildgrid("remote::buildgrid_200mb") else {
        return;
    };
    const SIZE: u64 = 200 << 20;
    let layers = DirLayers::new();
    let layer = layers.add_big(SIZE, 11);
    let result = RemoteResult {
        layers: vec![layer.clone()],
    };
    let writer = l3(&server, RemoteMode::ReadWrite, None, &layers);
    let ((), up) = peak_rss_growth(async {
        writer.store(&[1; 32], &result);
        settle(&writer).await;
    })
    .await;
    let status = writer.status();
    assert_eq!(status.uploads_done, 1, "{status:?}");
    assert!(
        (SIZE..SIZE + 4096).contains(&status.bytes_up),
        "the layer and a small result blob: {status:?}"
    );

    let elsewhere = DirLayers::new();
    let reader = l3(&server, RemoteMode::ReadOnly, None, &elsewhere);
    let target = elsewhere.path(&layer.diff_id);
    let (fetched, down) = peak_rss_growth(async {
        assert_eq!(reader.lookup(&[1; 32]).await, Some(result.clone()));
        let file = std::fs::File::create(&target).expect("create");
        reader.fetch_layer(&layer, file).await
    })
    .await;
    assert!(fetched.is_some(), "the 200 MB layer arrives verified");
    assert_eq!(std::fs::metadata(&target).expect("file").len(), SIZE);
    eprintln!(
        "200 MB through ByteStream: RSS grew by at most {} MiB uploading, {} MiB downloading",
        up >> 20,
        down >> 20
    );
    for (what, growth) in [("upload", up), ("download", down)] {
        assert!(
            growth < 64 << 20,
            "{what} of 200 MB grew RSS by {} MiB",
            growth >> 20
        );
    }
}
