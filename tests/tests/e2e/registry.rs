//! Registry pull and push against a real `docker-registry` on 127.0.0.1 (and, for a corrupt
//! blob, a hand-written HTTP server posing as one).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use memobuild_tests::registry::{ManifestFormat, TestRegistry, free_port};
use memobuildd::layout::Layout;
use memobuildd::registry::{
    DOCKER_MANIFEST, OCI_MANIFEST, Platform, PushEvent, PushImage, Reference, Registry,
    RegistryError, RegistryOptions,
};
use memobuildd::store::{Cas, Digest, Store, StoreOptions};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// Every registry operation in these tests is over in well under this.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(work: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("registry operation took too long")
}

fn cas(dir: &Path) -> Cas {
    Store::open(&Layout::new(dir.join("root")), StoreOptions::default())
        .expect("open the store")
        .cas()
}

/// A client whose Docker config is `config` (by default one that does not exist, so that
/// the machine's own credentials stay out of the tests).
fn client(dir: &Path, config: Option<&Path>) -> Registry {
    Registry::new(RegistryOptions {
        docker_config: Some(
            config.map_or_else(|| dir.join("no-docker-config.json"), Path::to_owned),
        ),
        ..RegistryOptions::default()
    })
    .expect("registry client")
}

fn reference(registry: &TestRegistry, name: &str) -> Reference {
    Reference::parse(&format!("{}/{name}", registry.address())).expect("reference")
}

fn temp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("root/tmp"))
        .expect("CAS tmp dir")
        .count()
}

/// Access-log lines are written after the response; wait until the count stops moving.
fn settled(count: impl Fn() -> usize) -> usize {
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn pull_stores_verified_blobs_and_a_second_pull_downloads_nothing() {
    let registry = TestRegistry::start();
    let seeded = registry.seed_busybox("base/busybox");
    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));
    let image = reference(&registry, "base/busybox:latest");
    let platform = Platform::host();
    // `skopeo inspect` in seeding read the config blob.
    let seeding_downloads = settled(|| registry.blob_downloads("base/busybox"));

    let resolved = bounded(client.resolve(&image, &platform))
        .await
        .expect("resolve");
    assert_eq!(resolved.manifest_digest, seeded);
    assert_eq!(resolved.media_type, OCI_MANIFEST);

    let pulled = bounded(client.pull(&cas, &image, &platform))
        .await
        .expect("pull");
    assert_eq!(pulled.manifest.digest, seeded);
    assert_eq!(Digest::of(&pulled.manifest_bytes), seeded);
    assert_eq!(Digest::of(&pulled.config_bytes), pulled.config.digest);
    assert_eq!(pulled.layers.len(), 1);
    assert_eq!(
        pulled.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    for blob in [&pulled.manifest, &pulled.config]
        .into_iter()
        .chain(pulled.layers.iter().map(|l| &l.blob))
    {
        cas.verify(blob)
            .unwrap_or_else(|err| panic!("{}: {err}", blob.digest));
    }
    let config: serde_json::Value =
        serde_json::from_slice(&pulled.config_bytes).expect("config JSON");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(temp_files(dir.path()), 0);

    let downloads = settled(|| registry.blob_downloads("base/busybox"));
    assert_eq!(
        downloads - seeding_downloads,
        2,
        "config and layer, once each"
    );
    let again = bounded(client.pull(&cas, &image, &platform))
        .await
        .expect("second pull");
    assert_eq!(again.manifest, pulled.manifest);
    assert_eq!(again.layers, pulled.layers);
    assert_eq!(
        settled(|| registry.blob_downloads("base/busybox")),
        downloads,
        "the second pull downloaded blobs"
    );

    for missing in ["base/busybox:no-such-tag", "no/such-repo:latest"] {
        let missing = reference(&registry, missing);
        let err = bounded(client.resolve(&missing, &platform))
            .await
            .expect_err("missing");
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.to_string()), "{err}");
    }
}

#[tokio::test]
async fn docker_schema_2_images_pull_and_push_unchanged() {
    let registry = TestRegistry::start();
    let seeded = registry.seed_busybox_as("docker/busybox", ManifestFormat::DockerV2);
    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));
    let pulled = bounded(client.pull(
        &cas,
        &reference(&registry, "docker/busybox:latest"),
        &Platform::host(),
    ))
    .await
    .expect("pull");
    assert_eq!(pulled.manifest.digest, seeded);
    assert_eq!(
        pulled.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&pulled.manifest_bytes).expect("manifest JSON");
    assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);

    let image = PushImage {
        manifest_bytes: pulled.manifest_bytes.clone(),
        manifest_media_type: DOCKER_MANIFEST.to_owned(),
        config: pulled.config.clone(),
        layers: pulled.layers.iter().map(|l| l.blob.clone()).collect(),
        mount_from: Vec::new(),
    };
    let report = bounded(client.push(
        &cas,
        &image,
        &reference(&registry, "docker/copy:v1"),
        &|_| {},
    ))
    .await
    .expect("push");
    assert_eq!(report.digest, seeded);
    assert_eq!(registry.inspect_digest("docker/copy:v1"), seeded);
}

#[tokio::test]
async fn an_index_resolves_to_the_manifest_of_the_wanted_platform() {
    let registry = TestRegistry::start();
    let seeded = registry.seed_busybox_index("multi/busybox", &["amd64", "arm64"]);
    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));
    let image = reference(&registry, "multi/busybox:latest");
    let linux = |architecture: &str| Platform {
        os: "linux".to_owned(),
        architecture: architecture.to_owned(),
        variant: None,
    };

    for (architecture, digest) in &seeded.manifests {
        let resolved = bounded(client.resolve(&image, &linux(architecture)))
            .await
            .unwrap_or_else(|err| panic!("{architecture}: {err}"));
        assert_eq!(&resolved.manifest_digest, digest, "{architecture}");
        assert_eq!(resolved.media_type, OCI_MANIFEST);
    }
    let pinned = Reference::parse(&format!(
        "{}/multi/busybox@{}",
        registry.address(),
        seeded.index
    ))
    .expect("reference");
    let pulled = bounded(client.pull(&cas, &pinned, &linux("arm64")))
        .await
        .expect("pull arm64 through the index digest");
    assert_eq!(pulled.manifest.digest, seeded.manifests[1].1);
    let config: serde_json::Value =
        serde_json::from_slice(&pulled.config_bytes).expect("config JSON");
    assert_eq!(config["architecture"], "arm64");

    let err = bounded(client.resolve(&image, &linux("riscv64")))
        .await
        .expect_err("no riscv64 image");
    assert!(
        matches!(&err, RegistryError::NoMatchingPlatform { available, .. } if available.len() == 2),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("linux/riscv64")
            && message.contains("linux/amd64")
            && message.contains("linux/arm64"),
        "{message}"
    );
}

/// A hand-written HTTP/1.1 server posing as a registry: fixed responses by path, one
/// request per connection, and optionally a run of 503s first.
struct FakeRegistry {
    routes: HashMap<String, (String, Vec<u8>)>,
    /// Requests (other than `GET /v2/`) still to be answered 503.
    failures_left: AtomicUsize,
    /// Paths requested, in order.
    requests: Mutex<Vec<String>>,
}

/// A one-layer image served by a [`FakeRegistry`] as `bad/app:latest`, whose layer is
/// served as `served_layer` (the promised bytes, or others).
struct FakeImage {
    routes: HashMap<String, (String, Vec<u8>)>,
    layer_digest: Digest,
}

impl FakeImage {
    fn new(promised_layer: &[u8], served_layer: &[u8]) -> Self {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let (config_digest, layer_digest) = (Digest::of(config), Digest::of(promised_layer));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest.as_str(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest.as_str(), "size": promised_layer.len()}],
        });
        let blob = |bytes: &[u8]| ("application/octet-stream".to_owned(), bytes.to_vec());
        let routes = HashMap::from([
            (
                "/v2/".to_owned(),
                ("application/json".to_owned(), b"{}".to_vec()),
            ),
            (
                "/v2/bad/app/manifests/latest".to_owned(),
                (OCI_MANIFEST.to_owned(), manifest.to_string().into_bytes()),
            ),
            (format!("/v2/bad/app/blobs/{config_digest}"), blob(config)),
            (
                format!("/v2/bad/app/blobs/{layer_digest}"),
                blob(served_layer),
            ),
        ]);
        Self {
            routes,
            layer_digest,
        }
    }
}

impl FakeRegistry {
    /// Starts serving `image` on a free 127.0.0.1 port; returns the address and the
    /// server's task (abort it when done).
    async fn start(
        image: FakeImage,
        failures: usize,
    ) -> (Arc<Self>, String, tokio::task::JoinHandle<()>) {
        let fake = Arc::new(Self {
            routes: image.routes,
            failures_left: AtomicUsize::new(failures),
            requests: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(Arc::clone(&fake).serve(listener));
        (fake, address, server)
    }

    fn requests_of(&self, path: &str) -> usize {
        let requests = self.requests.lock().expect("requests");
        requests.iter().filter(|p| *p == path).count()
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(Arc::clone(&self).answer(stream));
        }
    }

    async fn answer(self: Arc<Self>, stream: tokio::net::TcpStream) {
        let mut stream = tokio::io::BufReader::new(stream);
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await.is_err() {
            return;
        }
        loop {
            let mut header = String::new();
            match stream.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        self.requests
            .lock()
            .expect("requests")
            .push(path.to_owned());
        let fail = path != "/v2/"
            && self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let (status, content_type, body) = match self.routes.get(path) {
            _ if fail => ("503 Service Unavailable", "text/plain", &b"busy"[..]),
            Some((content_type, body)) => ("200 OK", content_type.as_str(), body.as_slice()),
            None => ("404 Not Found", "text/plain", &b""[..]),
        };
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\
             Docker-Distribution-Api-Version: registry/2.0\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            response.extend_from_slice(body);
        }
        let _ = stream.get_mut().write_all(&response).await;
        let _ = stream.get_mut().shutdown().await;
    }
}

#[tokio::test]
async fn a_corrupt_blob_is_rejected_by_digest_and_never_stored() {
    let tampered = b"the layer an attacker delivers!";
    let image = FakeImage::new(b"the layer the manifest promises", tampered);
    let layer_digest = image.layer_digest.clone();
    let (_fake, address, server) = FakeRegistry::start(image, 0).await;

    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));
    let image = Reference::parse(&format!("{address}/bad/app")).expect("reference");
    let err = bounded(client.pull(&cas, &image, &Platform::host()))
        .await
        .expect_err("a corrupt layer must fail the pull");
    server.abort();

    assert!(
        matches!(&err, RegistryError::Corrupt { digest, .. } if digest == &layer_digest),
        "{err:?}"
    );
    assert!(err.to_string().contains(layer_digest.as_str()), "{err}");
    assert!(!cas.contains(&layer_digest));
    assert!(!cas.contains(&Digest::of(tampered)));
    assert_eq!(temp_files(dir.path()), 0, "a temp file was left behind");
}

#[tokio::test]
async fn passing_server_errors_are_retried_a_bounded_number_of_times() {
    let layer = b"layer";
    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));

    // Two 503s, then answers: the pull goes through.
    let (fake, address, server) = FakeRegistry::start(FakeImage::new(layer, layer), 2).await;
    let image = Reference::parse(&format!("{address}/bad/app")).expect("reference");
    let pulled = bounded(client.pull(&cas, &image, &Platform::host()))
        .await
        .expect("pull after two 503s");
    server.abort();
    assert_eq!(pulled.layers[0].blob.digest, Digest::of(layer));
    assert_eq!(fake.requests_of("/v2/bad/app/manifests/latest"), 3);

    // Nothing but 503s: four tries, then the error, in bounded time.
    let (fake, address, server) = FakeRegistry::start(FakeImage::new(layer, layer), 1000).await;
    let image = Reference::parse(&format!("{address}/bad/app")).expect("reference");
    let started = Instant::now();
    let err = bounded(client.resolve(&image, &Platform::host()))
        .await
        .expect_err("a registry that only answers 503");
    server.abort();
    assert!(matches!(err, RegistryError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(fake.requests_of("/v2/bad/app/manifests/latest"), 4);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn push_uploads_only_what_is_missing_and_mounts_from_siblings() {
    let registry = TestRegistry::start();
    let seeded = registry.seed_busybox("base/busybox");
    let dir = TempDir::new().expect("temp dir");
    let (cas, client) = (cas(dir.path()), client(dir.path(), None));
    let pulled = bounded(client.pull(
        &cas,
        &reference(&registry, "base/busybox:latest"),
        &Platform::host(),
    ))
    .await
    .expect("pull");
    let mut image = PushImage {
        manifest_bytes: pulled.manifest_bytes.clone(),
        manifest_media_type: OCI_MANIFEST.to_owned(),
        config: pulled.config.clone(),
        layers: pulled.layers.iter().map(|l| l.blob.clone()).collect(),
        mount_from: Vec::new(),
    };
    let blob_bytes = pulled.config.size + pulled.layers.iter().map(|l| l.blob.size).sum::<u64>();

    let events = Mutex::new(Vec::new());
    let record = |event: PushEvent| events.lock().expect("events").push(event);
    let report = bounded(client.push(&cas, &image, &reference(&registry, "apps/copy:v1"), &record))
        .await
        .expect("push");
    assert_eq!(report.digest, seeded);
    assert_eq!(
        (
            report.blobs_uploaded,
            report.blobs_skipped,
            report.blobs_mounted
        ),
        (2, 0, 0)
    );
    assert_eq!(report.bytes_uploaded, blob_bytes);
    assert_eq!(registry.inspect_digest("apps/copy:v1"), seeded);
    let done: Vec<Digest> = events
        .lock()
        .expect("events")
        .iter()
        .filter_map(|e| match e {
            PushEvent::Done { digest, .. } => Some(digest.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(done.len(), 2, "{:?}", events.lock().expect("events"));
    let uploads = settled(|| registry.blob_uploads("apps/copy"));
    assert_eq!(uploads, 2);

    let again = bounded(client.push(&cas, &image, &reference(&registry, "apps/copy:v1"), &|_| {}))
        .await
        .expect("push again");
    assert_eq!(
        (
            again.blobs_uploaded,
            again.blobs_skipped,
            again.bytes_uploaded
        ),
        (0, 2, 0)
    );
    assert_eq!(settled(|| registry.blob_uploads("apps/copy")), uploads);

    image.mount_from = vec!["nowhere/empty".to_owned(), "base/busybox".to_owned()];
    events.lock().expect("events").clear();
    let mounted = bounded(client.push(
        &cas,
        &image,
        &reference(&registry, "apps/mounted:v1"),
        &record,
    ))
    .await
    .expect("push with mounts");
    let mounted_from: Vec<String> = events
        .lock()
        .expect("events")
        .iter()
        .filter_map(|e| match e {
            PushEvent::Mounted { from, .. } => Some(from.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(mounted_from, ["base/busybox", "base/busybox"]);
    assert_eq!(
        (
            mounted.blobs_uploaded,
            mounted.blobs_mounted,
            mounted.bytes_uploaded
        ),
        (0, 2, 0)
    );
    assert_eq!(registry.inspect_digest("apps/mounted:v1"), seeded);
    assert_eq!(settled(|| registry.blob_uploads("apps/mounted")), 0);
    assert_eq!(
        registry.requests("POST", "/v2/apps/mounted/blobs/uploads/?mount="),
        4,
        "each blob: a failed mount from nowhere/empty, then one from base/busybox"
    );
}

#[tokio::test]
async fn an_htpasswd_registry_takes_docker_config_credentials_and_refuses_anonymous() {
    let registry = TestRegistry::start_with_htpasswd("builder", "s3cret:pass");
    let seeded = registry.seed_busybox("base/busybox");
    let dir = TempDir::new().expect("temp dir");
    let cas = cas(dir.path());
    let base = reference(&registry, "base/busybox:latest");
    let target = reference(&registry, "apps/private:v1");
    // Not there yet: the first request goes out anonymously.
    let docker_config = dir.path().join("docker/config.json");
    let client = client(dir.path(), Some(&docker_config));

    let err = bounded(client.resolve(&base, &Platform::host()))
        .await
        .expect_err("anonymous resolve");
    assert!(
        matches!(&err, RegistryError::Unauthorized { registry: r, .. } if *r == registry.address()),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("docker login"), "{message}");
    assert!(message.contains("MEMOBUILD_REGISTRY_USER"), "{message}");

    // `docker login`, as it writes the config; the same client picks it up.
    std::fs::create_dir_all(docker_config.parent().expect("parent")).expect("mkdir");
    let auth = base64::engine::general_purpose::STANDARD.encode("builder:s3cret:pass");
    std::fs::write(
        &docker_config,
        serde_json::json!({"auths": {registry.address(): {"auth": auth}}}).to_string(),
    )
    .expect("write config.json");
    let pulled = bounded(client.pull(&cas, &base, &Platform::host()))
        .await
        .expect("pull with credentials");
    let image = PushImage {
        manifest_bytes: pulled.manifest_bytes.clone(),
        manifest_media_type: OCI_MANIFEST.to_owned(),
        config: pulled.config.clone(),
        layers: pulled.layers.iter().map(|l| l.blob.clone()).collect(),
        mount_from: Vec::new(),
    };
    let report = bounded(client.push(&cas, &image, &target, &|_| {}))
        .await
        .expect("push with credentials");
    assert_eq!(report.digest, seeded);
    assert_eq!(registry.inspect_digest("apps/private:v1"), seeded);

    let anonymous = self::client(dir.path(), None);
    let err = bounded(anonymous.push(&cas, &image, &target, &|_| {}))
        .await
        .expect_err("anonymous push");
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn https_registries_are_trusted_through_an_extra_ca_only() {
    let registry = TestRegistry::start_tls();
    let seeded = registry.seed_busybox("tls/busybox");
    let dir = TempDir::new().expect("temp dir");
    let image = reference(&registry, "tls/busybox:latest");

    let trusting = Registry::new(RegistryOptions {
        extra_ca: registry.ca.clone(),
        docker_config: Some(dir.path().join("no-docker-config.json")),
        ..RegistryOptions::default()
    })
    .expect("client with the test CA");
    let resolved = bounded(trusting.resolve(&image, &Platform::host()))
        .await
        .expect("resolve over HTTPS");
    assert_eq!(resolved.manifest_digest, seeded);

    let err = bounded(client(dir.path(), None).resolve(&image, &Platform::host()))
        .await
        .expect_err("an unknown CA");
    assert!(
        matches!(&err, RegistryError::Untrusted { registry: r, .. } if *r == registry.address()),
        "{err:?}"
    );
    assert!(err.to_string().contains("extra_ca"), "{err}");
}

#[tokio::test]
async fn a_registry_that_is_down_is_reported_unavailable_quickly() {
    let dir = TempDir::new().expect("temp dir");
    let client = client(dir.path(), None);
    let address = format!("127.0.0.1:{}", free_port());
    let image = Reference::parse(&format!("{address}/some/app:v1")).expect("reference");

    let started = Instant::now();
    let err = bounded(client.resolve(&image, &Platform::host()))
        .await
        .expect_err("nobody listens");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, RegistryError::Unavailable { registry, .. } if *registry == address),
        "{err:?}"
    );
    assert!(err.to_string().contains(&address), "{err}");
}
