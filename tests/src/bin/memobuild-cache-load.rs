//! `memobuild-cache-load`: a load generator for REAPI caches (and our Bazel-HTTP side), used
//! by `bench/cache-load.sh` to compare `memobuildd serve-cache` with BuildGrid under the
//! same load. N concurrent clients, each with its own gRPC connection (and HTTP
//! connection), run a fixed mix of FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs,
//! ByteStream Read/Write and (with `--http`) HTTP GET/PUT on `/cas/` for a bounded time,
//! over a working set uploaded first. Prints one JSON object: operations, errors,
//! throughput, and p50/p99 latency per kind and for small requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use memobuild_tests::cacheserver::{blob, digest, write_requests};
use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use serde_json::json;
use tonic::transport::Channel;

const USAGE: &str = "usage: memobuild-cache-load --target http://HOST:PORT [--instance NAME] \
    [--clients N] [--duration SECS] [--http] [--small-only] [--label TEXT]";
const SMALL_BLOBS: u64 = 256;
const LARGE_BLOBS: u64 = 8;
const LARGE: usize = 1 << 20;
const WRITE: usize = 256 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Options {
    target: String,
    instance: String,
    clients: usize,
    duration: Duration,
    http: bool,
    /// Only small requests: no ByteStream transfers.
    small_only: bool,
    label: String,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        target: String::new(),
        instance: String::new(),
        clients: 50,
        duration: Duration::from_secs(15),
        http: false,
        small_only: false,
        label: String::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--target" => options.target = value()?,
            "--instance" => options.instance = value()?,
            "--clients" => options.clients = value()?.parse()?,
            "--duration" => options.duration = Duration::from_secs_f64(value()?.parse()?),
            "--http" => options.http = true,
            "--small-only" => options.small_only = true,
            "--label" => options.label = value()?,
            _ => bail!("unknown argument {arg}\n{USAGE}"),
        }
    }
    if options.target.is_empty() {
        bail!("{USAGE}");
    }
    Ok(options)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    FindMissing,
    BatchRead,
    BatchUpdate,
    StreamRead,
    StreamWrite,
    HttpGet,
    HttpPut,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::FindMissing => "find_missing_blobs",
            Self::BatchRead => "batch_read_blobs",
            Self::BatchUpdate => "batch_update_blobs",
            Self::StreamRead => "bytestream_read_1MiB",
            Self::StreamWrite => "bytestream_write_256KiB",
            Self::HttpGet => "http_get",
            Self::HttpPut => "http_put",
        }
    }

    fn small(self) -> bool {
        !matches!(self, Self::StreamRead | Self::StreamWrite)
    }

    /// The mix: mostly the small look-ups a build's cache traffic is made of.
    fn pick(roll: u64, http: bool, small_only: bool) -> Self {
        let roll = roll % 100;
        if small_only {
            return match (roll, http) {
                (0..40, _) => Self::FindMissing,
                (40..60, true) => Self::HttpGet,
                (60..70, true) => Self::HttpPut,
                (70..85, true) | (40..70, false) => Self::BatchRead,
                _ => Self::BatchUpdate,
            };
        }
        if http {
            match roll {
                0..25 => Self::FindMissing,
                25..40 => Self::BatchRead,
                40..50 => Self::BatchUpdate,
                50..60 => Self::StreamRead,
                60..65 => Self::StreamWrite,
                65..90 => Self::HttpGet,
                _ => Self::HttpPut,
            }
        } else {
            match roll {
                0..40 => Self::FindMissing,
                40..65 => Self::BatchRead,
                65..80 => Self::BatchUpdate,
                80..93 => Self::StreamRead,
                _ => Self::StreamWrite,
            }
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    latencies: BTreeMap<Op, Vec<Duration>>,
    errors: BTreeMap<Op, u64>,
    first_errors: Vec<String>,
}

/// The blobs uploaded before the run, with their digests computed once.
struct WorkingSet {
    small: Vec<(Vec<u8>, reapi::Digest)>,
    large: Vec<reapi::Digest>,
}

impl WorkingSet {
    fn new() -> Self {
        Self {
            small: (0..SMALL_BLOBS)
                .map(|i| {
                    let b = small_blob(i);
                    let d = digest(&b);
                    (b, d)
                })
                .collect(),
            large: (0..LARGE_BLOBS).map(|i| digest(&large_blob(i))).collect(),
        }
    }

    fn small(&self, roll: u64) -> &(Vec<u8>, reapi::Digest) {
        &self.small[usize::try_from(roll % SMALL_BLOBS).unwrap_or(0)]
    }
}

struct Client {
    id: u64,
    options: Options,
    set: Arc<WorkingSet>,
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: bs::byte_stream_client::ByteStreamClient<Channel>,
    http: reqwest::Client,
    nonce: u64,
    rng: u64,
    seq: u64,
}

fn small_blob(i: u64) -> Vec<u8> {
    blob(
        1024 + usize::try_from(i % 16).unwrap_or(0) * 1024,
        1_000_000 + i,
    )
}

fn large_blob(i: u64) -> Vec<u8> {
    blob(LARGE, 2_000_000 + i)
}

impl Client {
    fn roll(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Bytes no one uploaded before (this run, this client, this sequence number).
    fn fresh(&mut self, len: usize) -> Vec<u8> {
        self.seq += 1;
        let mut bytes = blob(len, self.nonce ^ (self.id << 40) ^ self.seq);
        bytes[..8].copy_from_slice(&self.seq.to_le_bytes());
        bytes
    }

    async fn run(&mut self, op: Op) -> anyhow::Result<()> {
        let instance = self.options.instance.clone();
        match op {
            Op::FindMissing => {
                let mut digests: Vec<reapi::Digest> = (0..16)
                    .map(|_| {
                        let roll = self.roll();
                        self.set.small(roll).1.clone()
                    })
                    .collect();
                let absent = self.fresh(100);
                digests.push(digest(&absent));
                let response = self
                    .cas
                    .find_missing_blobs(reapi::FindMissingBlobsRequest {
                        instance_name: instance,
                        blob_digests: digests,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if response.missing_blob_digests.len() != 1 {
                    bail!(
                        "FindMissingBlobs: {} missing, expected 1",
                        response.missing_blob_digests.len()
                    );
                }
            }
            Op::BatchRead => {
                let set = Arc::clone(&self.set);
                let blobs: Vec<&(Vec<u8>, reapi::Digest)> =
                    (0..4).map(|_| set.small(self.roll())).collect();
                let response = self
                    .cas
                    .batch_read_blobs(reapi::BatchReadBlobsRequest {
                        instance_name: instance,
                        digests: blobs.iter().map(|(_, d)| d.clone()).collect(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                // Responses may come in any order (and a repeated digest once): match by digest.
                for (expected, d) in &blobs {
                    let item = response
                        .responses
                        .iter()
                        .find(|r| r.digest.as_ref() == Some(d))
                        .with_context(|| format!("BatchReadBlobs did not answer for {}", d.hash))?;
                    if item.status.as_ref().is_some_and(|s| s.code != 0) || item.data != *expected {
                        bail!("BatchReadBlobs returned wrong data or {:?}", item.status);
                    }
                }
            }
            Op::BatchUpdate => {
                let blobs: Vec<Vec<u8>> = (0..2).map(|_| self.fresh(4096)).collect();
                let response = self
                    .cas
                    .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                        instance_name: instance,
                        requests: blobs
                            .into_iter()
                            .map(|b| reapi::batch_update_blobs_request::Request {
                                digest: Some(digest(&b)),
                                data: b,
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if let Some(bad) = response
                    .responses
                    .iter()
                    .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
                {
                    bail!("BatchUpdateBlobs: {:?}", bad.status);
                }
            }
            Op::StreamRead => {
                let i = usize::try_from(self.roll() % LARGE_BLOBS).unwrap_or(0);
                let d = self.set.large[i].clone();
                let prefix = if instance.is_empty() {
                    String::new()
                } else {
                    format!("{instance}/")
                };
                let mut stream = self
                    .bytestream
                    .read(bs::ReadRequest {
                        resource_name: format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes),
                        read_offset: 0,
                        read_limit: 0,
                    })
                    .await?
                    .into_inner();
                let mut got = 0;
                while let Some(message) = stream.message().await? {
                    got += message.data.len();
                }
                if got != LARGE {
                    bail!("ByteStream.Read returned {got} bytes of {LARGE}");
                }
            }
            Op::StreamWrite => {
                let bytes = self.fresh(WRITE);
                let d = digest(&bytes);
                let prefix = if instance.is_empty() {
                    String::new()
                } else {
                    format!("{instance}/")
                };
                let name = format!(
                    "{prefix}uploads/{}-{}/blobs/{}/{}",
                    self.id, self.seq, d.hash, d.size_bytes
                );
                let requests = write_requests(&name, &bytes, 64 << 10);
                let response = self
                    .bytestream
                    .write(tonic::codegen::tokio_stream::iter(requests))
                    .await?
                    .into_inner();
                if response.committed_size != d.size_bytes {
                    bail!(
                        "ByteStream.Write committed {} of {}",
                        response.committed_size,
                        d.size_bytes
                    );
                }
            }
            Op::HttpGet => {
                let set = Arc::clone(&self.set);
                let (bytes, d) = set.small(self.roll());
                let url = format!("{}/cas/{}", self.options.target, d.hash);
                let response = self.http.get(url).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() || body.as_ref() != bytes.as_slice() {
                    bail!("HTTP GET: {status}");
                }
            }
            Op::HttpPut => {
                let bytes = self.fresh(4096);
                let url = format!("{}/cas/{}", self.options.target, digest(&bytes).hash);
                let status = self.http.put(url).body(bytes).send().await?.status();
                if !status.is_success() {
                    bail!("HTTP PUT: {status}");
                }
            }
        }
        Ok(())
    }
}

/// Uploads the working set: small blobs in batches, large ones through ByteStream.
async fn seed(options: &Options, channel: Channel) -> anyhow::Result<()> {
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    for chunk in (0..SMALL_BLOBS).collect::<Vec<_>>().chunks(64) {
        let response = cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: options.instance.clone(),
                requests: chunk
                    .iter()
                    .map(|i| {
                        let b = small_blob(*i);
                        reapi::batch_update_blobs_request::Request {
                            digest: Some(digest(&b)),
                            data: b,
                            ..Default::default()
                        }
                    })
                    .collect(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if response
            .responses
            .iter()
            .any(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        {
            bail!("seeding small blobs failed: {response:?}");
        }
    }
    let mut bytestream = bs::byte_stream_client::ByteStreamClient::new(channel);
    for i in 0..LARGE_BLOBS {
        let bytes = large_blob(i);
        let d = digest(&bytes);
        let prefix = if options.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", options.instance)
        };
        let name = format!("{prefix}uploads/seed-{i}/blobs/{}/{}", d.hash, d.size_bytes);
        let requests = write_requests(&name, &bytes, 64 << 10);
        bytestream
            .write(tonic::codegen::tokio_stream::iter(requests))
            .await
            .context("seeding a large blob")?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    // reqwest is built without a default TLS provider (as everywhere in the workspace).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let connect = || async {
        Channel::from_shared(options.target.clone())?
            .timeout(REQUEST_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", options.target))
    };
    seed(&options, connect().await?).await?;
    let set = Arc::new(WorkingSet::new());
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut clients = Vec::new();
    for id in 0..options.clients as u64 {
        let channel = connect().await?;
        clients.push(Client {
            id,
            options: options.clone(),
            set: Arc::clone(&set),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(8 << 20),
            bytestream: bs::byte_stream_client::ByteStreamClient::new(channel),
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()?,
            nonce,
            rng: (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            seq: 0,
        });
    }
    let started = Instant::now();
    let deadline = started + options.duration;
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for mut client in clients {
        let tally = Arc::clone(&tally);
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            while Instant::now() < deadline {
                let op = Op::pick(
                    client.roll(),
                    client.options.http,
                    client.options.small_only,
                );
                let began = Instant::now();
                let result = client.run(op).await;
                local.latencies.entry(op).or_default().push(began.elapsed());
                if let Err(err) = result {
                    *local.errors.entry(op).or_default() += 1;
                    if local.first_errors.len() < 3 {
                        local.first_errors.push(format!("{}: {err:#}", op.name()));
                    }
                }
            }
            let mut tally = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (op, mut l) in local.latencies {
                tally.latencies.entry(op).or_default().append(&mut l);
            }
            for (op, n) in local.errors {
                *tally.errors.entry(op).or_default() += n;
            }
            tally.first_errors.extend(local.first_errors);
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut by_kind = serde_json::Map::new();
    let (mut all, mut small) = (Vec::new(), Vec::new());
    let mut errors = 0;
    for (op, latencies) in &tally.latencies {
        let mut sorted = latencies.clone();
        sorted.sort_unstable();
        let op_errors = tally.errors.get(op).copied().unwrap_or(0);
        errors += op_errors;
        by_kind.insert(
            op.name().to_owned(),
            json!({
                "count": sorted.len(),
                "errors": op_errors,
                "p50_ms": percentile(&sorted, 0.5),
                "p99_ms": percentile(&sorted, 0.99),
            }),
        );
        all.extend_from_slice(&sorted);
        if op.small() {
            small.extend_from_slice(&sorted);
        }
    }
    all.sort_unstable();
    small.sort_unstable();
    let report = json!({
        "label": options.label,
        "target": options.target,
        "clients": options.clients,
        "duration_s": elapsed,
        "http": options.http,
        "small_only": options.small_only,
        "ops": all.len(),
        "errors": errors,
        "first_errors": tally.first_errors,
        "throughput_ops_s": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.5),
        "p99_ms": percentile(&all, 0.99),
        "small_p50_ms": percentile(&small, 0.5),
        "small_p99_ms": percentile(&small, 0.99),
        "by_kind": by_kind,
    });
    println!("{report}");
    Ok(())
}
