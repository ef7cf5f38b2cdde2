//! The Batch API's files (`/v1/files`): their bodies in an object store, their descriptions and owners in
//! Redis.
//!
//! Why an object store: a batch's input can be hundreds of megabytes, and its output as large; Redis holds
//! only state, never a file's body. The `object_store` crate gives one interface over the local file system
//! (the default, so a single machine needs nothing more) and S3-compatible storage (production, where every
//! gateway replica must see the same files). A file is written in one piece (a multipart upload that either
//! completes or leaves nothing), so a reader never sees half a file, and a file written again under the same
//! id (a batch's output, when finalization is redone after a crash) replaces the old one whole.
//!
//! A file belongs to the API key that made it (with keys off, to everyone, as jobs do); another key gets
//! 404, as if it did not exist.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncWriteExt};

use crate::auth::Caller;
use crate::keys::Keys;
use crate::kv::{Redis, RedisError};

/// Where file bodies are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A directory of the local file system (created if missing).
    Local(PathBuf),
    /// An S3-compatible bucket.
    S3 {
        bucket: String,
        /// The service's URL, for S3-compatible stores other than AWS (`http://` allowed).
        endpoint: Option<String>,
        region: String,
        /// Access key id and secret; without them, the environment's (`AWS_*`, an instance's role).
        credentials: Option<(String, String)>,
    },
}

impl Storage {
    /// Opens the store, and the prefix of every object's path in it. Nothing is touched yet: a local
    /// directory is made with the first file written in it, an S3 service is first asked then.
    pub fn open(&self) -> Result<(Arc<dyn ObjectStore>, String), String> {
        match self {
            Storage::Local(dir) => {
                let dir =
                    std::path::absolute(dir).map_err(|e| format!("--files-dir {}: {e}", dir.display()))?;
                let prefix = dir
                    .to_str()
                    .ok_or_else(|| format!("--files-dir {}: not UTF-8", dir.display()))?
                    .trim_matches('/')
                    .to_owned();
                // Rooted at `/`, with the directory as the paths' prefix: a store rooted at the directory
                // itself would need the directory to exist before the first file.
                Ok((Arc::new(object_store::local::LocalFileSystem::new()), prefix))
            }
            Storage::S3 {
                bucket,
                endpoint,
                region,
                credentials,
            } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region);
                if let Some((id, secret)) = credentials {
                    builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                }
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    builder = builder.with_region("us-east-1");
                }
                let store = builder
                    .build()
                    .map_err(|e| format!("--files-s3-bucket {bucket}: {e}"))?;
                Ok((Arc::new(store), String::new()))
            }
        }
    }
}

/// What a file is for: `batch` for an input a client uploads, `batch_output` for the output and error files
/// a batch writes.
pub const PURPOSE_BATCH: &str = "batch";
pub const PURPOSE_BATCH_OUTPUT: &str = "batch_output";

/// A file, as OpenAI describes one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileObject {
    /// `file-…`.
    pub id: String,
    /// Always `file`.
    #[schema(value_type = String, example = "file")]
    pub object: String,
    /// Its size.
    pub bytes: u64,
    /// When it was made, in Unix seconds.
    pub created_at: u64,
    pub filename: String,
    /// `batch` (an input) or `batch_output` (a batch's output or error file).
    pub purpose: String,
    /// Always `processed`: a file is described only once stored whole.
    #[schema(value_type = String, example = "processed")]
    pub status: String,
    /// Always null (OpenAI's field, deprecated there).
    #[schema(value_type = Option<String>)]
    pub status_details: Option<String>,
}

/// A page of files or batches, as OpenAI lists them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    /// Always `list`.
    #[schema(value_type = String, example = "list")]
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Whether more follow the last one (ask again with `after` = `last_id`).
    pub has_more: bool,
}

impl<T> List<T> {
    /// A page of `data`, one more than asked fetched, so that `has_more` is known.
    pub fn page(mut data: Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> Self {
        let has_more = data.len() > limit;
        data.truncate(limit);
        Self {
            object: "list",
            first_id: data.first().map(|t| id(t).to_owned()),
            last_id: data.last().map(|t| id(t).to_owned()),
            data,
            has_more,
        }
    }
}

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("the file is larger than {limit} bytes, the most a file may hold")]
    TooLarge { limit: u64 },
    #[error("no such file")]
    NotFound,
    #[error("the upload could not be read: {0}")]
    Upload(String),
    #[error("file store: {0}")]
    Store(#[from] object_store::Error),
    #[error("file store: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("file description: {0}")]
    Corrupt(String),
}

/// Whose files and batches a caller sees: its key's digest, or with keys off, everyone's (`-`).
pub fn owner(caller: &Caller) -> String {
    caller.key.map_or_else(|| "-".to_owned(), |k| k.hex())
}

/// The files of one namespace.
#[derive(Clone)]
pub struct FileStore {
    objects: Arc<dyn ObjectStore>,
    /// Where in the store this deployment's objects lie (the local directory; nothing in a bucket).
    prefix: String,
    redis: Redis,
    keys: Keys,
}

impl FileStore {
    pub fn new((objects, prefix): (Arc<dyn ObjectStore>, String), redis: Redis, keys: Keys) -> Self {
        Self {
            objects,
            prefix,
            redis,
            keys,
        }
    }

    /// Where a file's body lies in the object store (under the namespace, so deployments can share a
    /// bucket).
    fn path(&self, id: &str) -> ObjectPath {
        match self.prefix.as_str() {
            "" => ObjectPath::from(self.keys.file_object(id)),
            prefix => ObjectPath::from(format!("{prefix}/{}", self.keys.file_object(id))),
        }
    }

    /// A new file's id.
    pub fn new_id() -> String {
        format!("file-{}", uuid::Uuid::new_v4().simple())
    }

    /// Deletes a body written for a file that was never described (an upload refused after its body).
    pub async fn discard(&self, id: &str) {
        if let Err(e) = self.objects.delete(&self.path(id)).await {
            tracing::warn!(file = %id, error = %e, "could not delete a refused upload's body");
        }
    }

    /// Writes `body` as file `id`'s body, in one piece; returns its size.
    pub async fn write(
        &self,
        id: &str,
        mut body: impl Stream<Item = Result<Bytes, FileError>> + Unpin,
        limit: u64,
    ) -> Result<u64, FileError> {
        let mut writer = self.writer(id);
        let mut bytes = 0u64;
        let outcome = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                bytes += chunk.len() as u64;
                if bytes > limit {
                    return Err(FileError::TooLarge { limit });
                }
                writer.write_all(&chunk).await?;
            }
            writer.shutdown().await?;
            Ok(bytes)
        }
        .await;
        if outcome.is_err() {
            let _ = writer.abort().await;
        }
        outcome
    }

    /// A writer of file `id`'s body, in one piece: nothing is visible until its `shutdown` completes it.
    pub fn writer(&self, id: &str) -> object_store::buffered::BufWriter {
        object_store::buffered::BufWriter::new(self.objects.clone(), self.path(id))
    }

    /// Records `file` as `owner`'s (again, harmlessly, for a file described before).
    pub async fn describe(&self, owner: &str, file: &FileObject) -> Result<(), FileError> {
        let json = serde_json::to_string(file).map_err(|e| FileError::Corrupt(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.keys.file(&file.id),
                &[("object", json.as_str()), ("owner", owner)],
            )
            .ignore()
            .zadd(self.keys.files(owner), &file.id, shared::reply::now_ms())
            .ignore();
        self.redis
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await?;
        Ok(())
    }

    /// File `id` when `owner` owns it.
    pub async fn get(&self, owner: &str, id: &str) -> Result<FileObject, FileError> {
        let key = self.keys.file(id);
        let (object, who): (Option<String>, Option<String>) = self
            .redis
            .call(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("object")
                    .arg("owner")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        match (object, who) {
            (Some(object), Some(who)) if who == owner => {
                serde_json::from_str(&object).map_err(|e| FileError::Corrupt(e.to_string()))
            }
            _ => Err(FileError::NotFound),
        }
    }

    /// A page of `owner`'s files, newest first (`ascending`: oldest first), after the file `after`, of
    /// `purpose` when one is given.
    pub async fn list(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<List<FileObject>, FileError> {
        let ids = page_ids(&self.redis, self.keys.files(owner), ascending, after).await?;
        let mut data = Vec::new();
        for chunk in ids.chunks(256) {
            let keys: Vec<String> = chunk.iter().map(|id| self.keys.file(id)).collect();
            let objects: Vec<Option<String>> = self
                .redis
                .call(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.hget(key, "object");
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            for object in objects.into_iter().flatten() {
                let file: FileObject =
                    serde_json::from_str(&object).map_err(|e| FileError::Corrupt(e.to_string()))?;
                if purpose.is_none_or(|p| p == file.purpose) {
                    data.push(file);
                }
            }
            if data.len() > limit {
                break;
            }
        }
        Ok(List::page(data, limit, |f| &f.id))
    }

    /// File `id`'s body from byte `offset` on, as a stream (the file's description checked by the caller).
    pub async fn stream_from(
        &self,
        id: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, FileError>> + Send + 'static, FileError> {
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..Default::default()
        };
        let result = match self.objects.get_opts(&self.path(id), options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(FileError::NotFound),
            Err(e) => return Err(e.into()),
        };
        Ok(result.into_stream().map_err(FileError::from))
    }

    /// File `id`'s body from byte `offset` on, to be read line by line.
    pub async fn reader_from(
        &self,
        id: &str,
        offset: u64,
    ) -> Result<impl AsyncBufRead + Unpin + Send, FileError> {
        let stream = self
            .stream_from(id, offset)
            .await?
            .map_err(|e| std::io::Error::other(e.to_string()));
        Ok(tokio_util::io::StreamReader::new(Box::pin(stream)))
    }

    /// Deletes `owner`'s file `id`: its description first (from then on it is gone for clients), then its
    /// body.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<(), FileError> {
        self.get(owner, id).await?;
        let (file, files, member) = (self.keys.file(id), self.keys.files(owner), id.to_owned());
        self.redis
            .call(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .del(file)
                    .ignore()
                    .zrem(files, member)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        match self.objects.delete(&self.path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the object store answers (for readiness).
    pub async fn check(&self) -> Result<(), FileError> {
        match self.objects.head(&self.path("-")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The members of a sorted set in score order (a listing's ids by creation time, a batch's lines in flight),
/// ascending or descending, from just after `after` on (from the start when `after` is not in it).
pub async fn page_ids(
    redis: &Redis,
    key: String,
    ascending: bool,
    after: Option<&str>,
) -> Result<Vec<String>, RedisError> {
    let command = if ascending { "ZRANGE" } else { "ZREVRANGE" };
    let ids: Vec<String> = redis
        .call(|mut c| async move {
            redis::cmd(command)
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await?;
    Ok(match after.and_then(|a| ids.iter().position(|id| id == a)) {
        Some(i) => ids[i + 1..].to_vec(),
        None => ids,
    })
}
