//! A repository under a prefix of an S3 bucket, through the `object_store`
//! crate (typed create-only writes, retries with backoff, path-style
//! addressing for self-hosted servers). Its async calls run on one small
//! tokio runtime owned here; strata's worker threads block on them.
//!
//! Endpoint, credentials and region come from the standard variables:
//! `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION` (default `us-east-1`).
//!
//! Create-only writes use `If-None-Match: *`. `STRATA_S3_CONDITIONAL=off`
//! turns them into a `HEAD` followed by a plain `PUT` for stores that do
//! not support them; see docs/FORMAT.md for what holds then.

use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::{Backend, Created, ObjectInfo};
use crate::error::{Error, Result};
use crate::model::extent::ByteRange;

pub struct S3Backend {
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    bucket: String,
    prefix: String,
    endpoint: String,
    conditional: bool,
}

/// Connection failures are retried with backoff for this long, so that a
/// server that is down fails a command well within a minute.
const RETRY_TIMEOUT: Duration = Duration::from_secs(15);

impl S3Backend {
    /// Connect to `bucket`; with `create`, make the bucket when it is
    /// missing (`init`).
    pub fn connect(bucket: &str, prefix: &str, create: bool) -> Result<Self> {
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|e| !e.is_empty());
        let region = std::env::var("AWS_REGION")
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".to_string());
        let shown = endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let conditional = std::env::var("STRATA_S3_CONDITIONAL").as_deref() != Ok("off");
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&region)
            .with_conditional_put(if conditional {
                S3ConditionalPut::ETagMatch
            } else {
                S3ConditionalPut::Disabled
            })
            .with_retry(RetryConfig {
                max_retries: 6,
                retry_timeout: RETRY_TIMEOUT,
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(30))
                    .with_allow_http(
                        endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            );
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e);
        }
        // Every object strata reads is checked against a hash it knows
        // (packs and chunks by name, manifests by their chunks' names, all
        // sealed in an encrypted repository): signing each body too costs
        // a SHA-256 of every byte on both ends (~15% of strata's CPU in a
        // backup, more of the server's) for nothing more.
        // AWS_UNSIGNED_PAYLOAD=false signs them anyway.
        let unsigned = std::env::var("AWS_UNSIGNED_PAYLOAD").map_or(true, |v| {
            !matches!(v.to_ascii_lowercase().as_str(), "false" | "0")
        });
        builder = builder.with_unsigned_payload(unsigned);
        let store = builder.build().map_err(|e| Error::Remote {
            endpoint: shown.clone(),
            message: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 client's runtime", e))?;
        let backend = S3Backend {
            store,
            runtime,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: shown,
            conditional,
        };
        if create && backend.bucket_missing()? {
            backend.create_bucket()?;
        }
        Ok(backend)
    }

    /// Run one request on the runtime; at debug level, a line per request
    /// with its duration (the fixed cost of a command is requests in series).
    fn run<F: std::future::Future>(
        &self,
        op: &str,
        key: &dyn std::fmt::Display,
        request: F,
    ) -> F::Output {
        if !log::log_enabled!(log::Level::Debug) {
            return self.runtime.block_on(request);
        }
        let started = std::time::Instant::now();
        let out = self.runtime.block_on(request);
        log::debug!(
            "s3 {op} {key}: {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        out
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn key_of(&self, path: &ObjectPath) -> String {
        let raw = path.as_ref();
        if self.prefix.is_empty() {
            raw.to_string()
        } else {
            raw.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(raw)
                .to_string()
        }
    }

    fn err(&self, what: &str, key: &str, e: object_store::Error) -> Error {
        Error::Remote {
            endpoint: self.endpoint.clone(),
            message: format!(
                "{what} s3://{}/{}: {}",
                self.bucket,
                self.path(key),
                s3_message(&e)
            ),
        }
    }

    /// A write under a precondition (`mode`); `None` when the store refused
    /// it for the precondition (the object exists, changed, or is gone),
    /// else the new object's version if the store gave one.
    fn put_conditional(
        &self,
        key: &str,
        body: Vec<u8>,
        mode: PutMode,
        what: &str,
    ) -> Result<Option<Option<String>>> {
        let update = matches!(mode, PutMode::Update(_));
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let op = if update {
            "PUT If-Match"
        } else {
            "PUT If-None-Match"
        };
        let path = self.path(key);
        let put = self.store.put_opts(&path, PutPayload::from(body), opts);
        match self.run(op, &key, put) {
            Ok(r) => Ok(Some(r.e_tag)),
            // The precondition failed: the object exists (create), or it
            // changed or is gone (update). A missing bucket is an error.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e @ object_store::Error::NotFound { .. })
                if update && !e.to_string().contains("NoSuchBucket") =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err(what, key, e)),
        }
    }

    /// A plain write; the new version if the store gave one.
    fn put_plain(&self, key: &str, body: Vec<u8>) -> Result<Option<String>> {
        let payload = PutPayload::from(body);
        self.run("PUT", &key, self.store.put(&self.path(key), payload))
            .map(|r| r.e_tag)
            .map_err(|e| self.err("write", key, e))
    }

    /// A create-only write (see the module documentation for stores
    /// without conditional writes); `None` when an object exists, else
    /// the new version if the store gave one.
    fn create_owned(&self, key: &str, body: Vec<u8>) -> Result<Option<Option<String>>> {
        if !self.conditional {
            if self.head(key)?.is_some() {
                return Ok(None);
            }
            return self.put_plain(key, body).map(Some);
        }
        self.put_conditional(key, body, PutMode::Create, "create")
    }

    /// A 404 is a missing object, unless the bucket itself is missing.
    fn missing<T>(&self, e: object_store::Error, what: &str, key: &str) -> Result<Option<T>> {
        match e {
            object_store::Error::NotFound { .. } if !e.to_string().contains("NoSuchBucket") => {
                Ok(None)
            }
            e => Err(self.err(what, key, e)),
        }
    }

    /// Whether the bucket does not exist (a read in it says NoSuchBucket).
    fn bucket_missing(&self) -> Result<bool> {
        match self.get("config.json") {
            Ok(_) => Ok(false),
            Err(Error::Remote { message, .. }) if message.contains("NoSuchBucket") => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// CreateBucket, signed by the store's own signer; an existing bucket
    /// of ours is fine.
    fn create_bucket(&self) -> Result<()> {
        use object_store::signer::Signer;
        let url = self
            .runtime
            .block_on(self.store.signed_url(
                http::Method::PUT,
                &ObjectPath::from(""),
                Duration::from_secs(300),
            ))
            .map_err(|e| self.err("sign a request for", "", e))?;
        let status = self.runtime.block_on(async {
            use object_store::client::HttpConnector;
            let client = object_store::client::ReqwestConnector::default()
                .connect(
                    &ClientOptions::new()
                        .with_allow_http(true)
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_timeout(Duration::from_secs(30)),
                )
                .map_err(|e| e.to_string())?;
            let req = http::Request::builder()
                .method(http::Method::PUT)
                .uri(url.as_str())
                .body(object_store::client::HttpRequestBody::empty())
                .map_err(|e| e.to_string())?;
            let resp = client.execute(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp.into_body().bytes().await.unwrap_or_default();
            let body = String::from_utf8_lossy(&body).into_owned();
            Ok::<_, String>((status, body))
        });
        match status {
            Ok((s, _)) if s.is_success() => Ok(()),
            Ok((_, body)) if body.contains("BucketAlreadyOwnedByYou") => Ok(()),
            Ok((s, body)) => Err(Error::Remote {
                endpoint: self.endpoint.clone(),
                message: format!(
                    "create bucket {}: {s} {}",
                    self.bucket,
                    xml_error(&body).unwrap_or_default()
                ),
            }),
            Err(e) => Err(Error::Remote {
                endpoint: self.endpoint.clone(),
                message: format!("create bucket {}: {e}", self.bucket),
            }),
        }
    }
}

/// An object's version: its ETag, or its size and time for a store that
/// sends none.
fn version_of(m: &object_store::ObjectMeta) -> String {
    m.e_tag
        .clone()
        .unwrap_or_else(|| format!("{}@{}", m.size, m.last_modified.to_rfc3339()))
}

/// An S3 error in a line: the status and the server's `<Code>` and
/// `<Message>` when it sent them, else the client's own text.
fn s3_message(e: &object_store::Error) -> String {
    let text = e.to_string();
    match xml_error(&text) {
        Some(code) => code,
        None => text.lines().next().unwrap_or_default().to_string(),
    }
}

fn xml_error(body: &str) -> Option<String> {
    let tag = |name: &str| {
        let start = body.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + body[start..].find(&format!("</{name}>"))?;
        Some(body[start..end].to_string())
    };
    let code = tag("Code")?;
    Some(match tag("Message") {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code,
    })
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} at {}", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let got = self.run("GET", &key, async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        });
        match got {
            // Bytes from one response own their buffer: no copy.
            Ok(b) => Ok(Some(Vec::from(b))),
            Err(e) => self.missing(e, "read", key),
        }
    }

    fn get_range(&self, key: &str, range: ByteRange) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        // Named for the log only when it is written: this is the hot path.
        let got = self.run(
            "GET",
            &format_args!("{key} {range}"),
            self.store.get_range(&path, range.offset..range.end()),
        );
        match got {
            Ok(b) if b.len() as u64 == range.length => Ok(Some(Vec::from(b))),
            Ok(b) => Err(Error::Remote {
                endpoint: self.endpoint.clone(),
                message: format!(
                    "read {range} of s3://{}/{}: got {} bytes",
                    self.bucket,
                    self.path(key),
                    b.len()
                ),
            }),
            Err(e) => self.missing(e, "read", key),
        }
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        self.put_plain(key, body.to_vec()).map(|_| ())
    }

    fn put_new(&self, key: &str, body: &[u8]) -> Result<bool> {
        self.put_new_owned(key, body.to_vec())
    }

    fn create(&self, key: &str, body: &[u8]) -> Result<Created> {
        Ok(match self.create_owned(key, body.to_vec())? {
            Some(version) => Created::New(version),
            None => Created::Exists,
        })
    }

    fn put_new_owned(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        Ok(self.create_owned(key, body)?.is_some())
    }

    fn replace_if(&self, key: &str, body: &[u8], version: &str) -> Result<bool> {
        let mode = PutMode::Update(object_store::UpdateVersion {
            e_tag: Some(version.to_string()),
            version: None,
        });
        Ok(self
            .put_conditional(key, body.to_vec(), mode, "replace")?
            .is_some())
    }

    fn delete(&self, key: &str) -> Result<()> {
        match self.run("DELETE", &key, self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // S3 lists by string prefix; object_store by path segments. List
        // the segment that holds the prefix and filter.
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let base = if dir.is_empty() && self.prefix.is_empty() {
            None
        } else {
            Some(self.path(dir))
        };
        let listed: std::result::Result<Vec<_>, _> = self.run(
            "LIST",
            &prefix,
            self.store.list(base.as_ref()).try_collect(),
        );
        let listed = listed.map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = listed
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.key_of(&m.location),
                size: m.size,
                modified: m.last_modified,
                version: version_of(&m),
            })
            .filter(|o| o.key.starts_with(prefix))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.run("HEAD", &key, self.store.head(&self.path(key))) {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.size,
                modified: m.last_modified,
                version: version_of(&m),
            })),
            Err(e) => self.missing(e, "stat", key),
        }
    }

    fn local_root(&self) -> Option<&Path> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_in_a_line() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                    <Message>The request signature we calculated does not match</Message></Error>";
        assert_eq!(
            xml_error(body).unwrap(),
            "SignatureDoesNotMatch: The request signature we calculated does not match"
        );
        assert_eq!(xml_error("connection refused"), None);
    }
}
