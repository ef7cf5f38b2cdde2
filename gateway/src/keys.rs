//! Every Redis key and pub/sub channel of a namespace, named in one place.
//!
//! All of them start with `{ns}:`, so namespaces (a deployment's, each test's) share one Redis without
//! meeting. The modules that read and write them ([`crate::store`], [`crate::outbox`],
//! [`crate::admission`], [`crate::ratelimit`]) ask for names here, and their Lua scripts receive the names
//! as `KEYS` (channels as arguments) instead of spelling them. One name a script reads from data: a
//! record's field `active` holds its client's [`Keys::active`] set, written at admission, so that the
//! scripts that end a job know which set to leave.

use shared::{JobId, Lane, Topology};

use crate::auth::ClientId;

/// The names of one namespace's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{ns}:`
    prefix: String,
}

impl Keys {
    pub fn new(topology: &Topology) -> Self {
        Self {
            prefix: format!("{}:", topology.namespace()),
        }
    }

    fn key(&self, suffix: impl std::fmt::Display) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// `{ns}:*`: a `SCAN` pattern matching every key of the namespace.
    pub fn pattern(&self) -> String {
        self.key('*')
    }

    // Job records (`store`).

    /// `{ns}:job:{id}`: the job's record, a hash.
    pub fn job(&self, id: JobId) -> String {
        self.key(format_args!("job:{id}"))
    }

    /// `{ns}:events:{id}`: the job's event log, a stream.
    pub fn events(&self, id: JobId) -> String {
        self.key(format_args!("events:{id}"))
    }

    /// `{ns}:seq`: numbers submissions, for queue positions.
    pub fn seq(&self) -> String {
        self.key("seq")
    }

    /// `{ns}:running`: the jobs started and not finished, a sorted set by start time.
    pub fn running(&self) -> String {
        self.key("running")
    }

    /// `{ns}:taken`: counts the jobs that have left `queued`.
    pub fn taken(&self) -> String {
        self.key("taken")
    }

    /// `{ns}:stats`: queue-wide averages, a hash.
    pub fn stats(&self) -> String {
        self.key("stats")
    }

    /// `{ns}:done`: the pub/sub channel on which finished job ids are announced.
    pub fn done_channel(&self) -> String {
        self.key("done")
    }

    /// `{ns}:events`: the pub/sub channel on which a job id is announced whenever its event log grows.
    pub fn events_channel(&self) -> String {
        self.key("events")
    }

    // The outbox (`outbox`).

    /// `{ns}:outbox` (interactive jobs) and `{ns}:outbox:batch` (batch jobs): the ids of a lane's jobs
    /// kept, a sorted set by when a sweep may take each. One set per lane, so that the lane a job is
    /// republished to is where it is kept (a gateway of an earlier release sweeps only the interactive set,
    /// and so never sends a batch job to the interactive queue).
    pub fn outbox(&self, lane: Lane) -> String {
        match lane {
            Lane::Interactive => self.key("outbox"),
            Lane::Batch => self.key("outbox:batch"),
        }
    }

    /// `{ns}:outbox:{id}`: a kept job's body.
    pub fn outbox_body(&self, id: JobId) -> String {
        self.key(format_args!("outbox:{id}"))
    }

    /// `{ns}:outbox:lock:{id}`: held by the replica republishing the job.
    pub fn outbox_lock(&self, id: JobId) -> String {
        self.key(format_args!("outbox:lock:{id}"))
    }

    // Batch API files and batches (`files`, `batches`). A file's body is in the object store, never here.

    /// `{ns}:file:{id}`: a file's description and owner, a hash.
    pub fn file(&self, id: &str) -> String {
        self.key(format_args!("file:{id}"))
    }

    /// `{ns}/files/{id}`: where a file's body lies in the object store (a path, not a Redis key).
    pub fn file_object(&self, id: &str) -> String {
        format!("{}/files/{id}", self.prefix.trim_end_matches(':'))
    }

    /// `{ns}:files:{owner}`: an owner's file ids, a sorted set by creation time.
    pub fn files(&self, owner: &str) -> String {
        self.key(format_args!("files:{owner}"))
    }

    /// `{ns}:batch:{id}`: a batch's state, a hash.
    pub fn batch(&self, id: &str) -> String {
        self.key(format_args!("batch:{id}"))
    }

    /// `{ns}:batches:{owner}`: an owner's batch ids, a sorted set by creation time.
    pub fn batches(&self, owner: &str) -> String {
        self.key(format_args!("batches:{owner}"))
    }

    /// `{ns}:batches-active`: the batches not yet ended, which some replica must drive.
    pub fn batches_active(&self) -> String {
        self.key("batches-active")
    }

    /// `{ns}:batch:{id}:inflight`: the batch's lines submitted and not yet ended, a sorted set by line.
    pub fn batch_inflight(&self, id: &str) -> String {
        self.key(format_args!("batch:{id}:inflight"))
    }

    /// `{ns}:batch:{id}:refused`: the batch's lines refused at submission, line → error, a hash.
    pub fn batch_refused(&self, id: &str) -> String {
        self.key(format_args!("batch:{id}:refused"))
    }

    /// `{ns}:batch:{id}:lease`: held by the replica driving the batch.
    pub fn batch_lease(&self, id: &str) -> String {
        self.key(format_args!("batch:{id}:lease"))
    }

    // A client's bounds (`ratelimit`, `admission`).

    /// `{ns}:rl:{class}:{client}`: the client's sliding-window log of one route class.
    pub fn request_log(&self, class: &str, client: &ClientId) -> String {
        self.key(format_args!("rl:{class}:{}", client.key_part()))
    }

    /// `{ns}:rl:tokens:{client}`: the client's token bucket.
    pub fn token_bucket(&self, client: &ClientId) -> String {
        self.key(format_args!("rl:tokens:{}", client.key_part()))
    }

    /// `{ns}:active:{client}`: the ids of the client's jobs that have not ended, a sorted set.
    pub fn active(&self, client: &ClientId) -> String {
        self.key(format_args!("active:{}", client.key_part()))
    }

    /// `{ns}:idem:{client}:{digest}`: the job an `Idempotency-Key` (its digest) named, and its body's.
    pub fn idempotency(&self, client: &ClientId, key_digest: &str) -> String {
        self.key(format_args!("idem:{}:{key_digest}", client.key_part()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_namespace() {
        let keys = Keys::new(&Topology::new("blue", 3).unwrap());
        let id: JobId = "00000000-0000-4000-8000-000000000001".parse().unwrap();
        let client = ClientId::Ip("127.0.0.1".parse().unwrap());
        assert_eq!(keys.job(id), format!("blue:job:{id}"));
        assert_eq!(keys.outbox_lock(id), format!("blue:outbox:lock:{id}"));
        assert_eq!(keys.outbox(Lane::Interactive), "blue:outbox");
        assert_eq!(keys.outbox(Lane::Batch), "blue:outbox:batch");
        assert_eq!(keys.request_log("submit", &client), "blue:rl:submit:ip:127.0.0.1");
        assert_eq!(keys.token_bucket(&client), "blue:rl:tokens:ip:127.0.0.1");
        assert_eq!(keys.idempotency(&client, "ab"), "blue:idem:ip:127.0.0.1:ab");
        assert_eq!(keys.pattern(), "blue:*");
    }
}
