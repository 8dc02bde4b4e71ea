//! Attempt credentials: what an agent shows the broker when it reports.
//!
//! An agent runs next to untrusted code, so its credential must be worth as little
//! as possible if the workload steals it: it names one job and one attempt, and the
//! broker accepts with it only reports on that attempt (and the attempt's secrets
//! while it is live). It is an HMAC of `job/attempt` under the broker's key, so any
//! host of the broker (the local process, a cloud function) checks it without
//! storing one per VM.
//!
//! Format: `rat1.<job id>.<attempt>.<hex HMAC-SHA256>`.
//!
//! A cloud pool VM, which runs attempt after attempt, holds a VM credential instead
//! (`rvm1.<vm name>.<hex HMAC-SHA256>`): with it the VM can only ask which attempt
//! is assigned to it now, and gets that attempt's credential in the answer.

use hmac::Mac;

use crate::job::JobId;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const PREFIX: &str = "rat1";
const VM_PREFIX: &str = "rvm1";
/// Bytes of a freshly generated key.
pub const KEY_BYTES: usize = 32;

/// The broker's key for attempt credentials. Its `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct AttemptKey(Vec<u8>);

impl std::fmt::Debug for AttemptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttemptKey(<redacted>)")
    }
}

/// What a valid credential names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRef {
    pub job: JobId,
    pub attempt: u32,
}

impl AttemptKey {
    /// A key from stored bytes; `None` when too short to be one of ours.
    pub fn from_bytes(bytes: &[u8]) -> Option<AttemptKey> {
        (bytes.len() >= 16).then(|| AttemptKey(bytes.to_vec()))
    }

    /// A new random key.
    pub fn generate() -> Result<AttemptKey, getrandom::Error> {
        let mut key = vec![0u8; KEY_BYTES];
        getrandom::fill(&mut key)?;
        Ok(AttemptKey(key))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, job: &JobId, attempt: u32) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(format!("{PREFIX}/{job}/{attempt}").as_bytes());
        mac
    }

    fn vm_mac(&self, vm: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(format!("{VM_PREFIX}/{vm}").as_bytes());
        mac
    }

    /// The credential of pool VM `vm` (a name of `a-z`, `0-9` and `-`).
    pub fn vm_credential(&self, vm: &str) -> String {
        let tag = hex::encode(self.vm_mac(vm).finalize().into_bytes());
        format!("{VM_PREFIX}.{vm}.{tag}")
    }

    /// The pool VM a VM credential names, if this key made it.
    pub fn verify_vm(&self, credential: &str) -> Option<String> {
        let mut parts = credential.trim().split('.');
        let (prefix, vm, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if prefix != VM_PREFIX || parts.next().is_some() || vm.is_empty() {
            return None;
        }
        let tag = hex::decode(tag).ok()?;
        self.vm_mac(vm).verify_slice(&tag).ok()?;
        Some(vm.to_owned())
    }

    /// A key for another purpose (`label`), derived from this one, so that one
    /// secret on disk serves several without any two sharing a key.
    pub fn derive(&self, label: &str) -> Vec<u8> {
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(b"derive/");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The credential of `job`'s attempt `attempt`.
    pub fn credential(&self, job: &JobId, attempt: u32) -> String {
        let tag = hex::encode(self.mac(job, attempt).finalize().into_bytes());
        format!("{PREFIX}.{job}.{attempt}.{tag}")
    }

    /// The attempt a credential names, if this key made it (compared in constant time).
    pub fn verify(&self, credential: &str) -> Option<AttemptRef> {
        let mut parts = credential.trim().split('.');
        let (prefix, job, attempt, tag) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if prefix != PREFIX || parts.next().is_some() {
            return None;
        }
        let job: JobId = job.parse().ok()?;
        let attempt: u32 = attempt.parse().ok()?;
        let tag = hex::decode(tag).ok()?;
        self.mac(&job, attempt).verify_slice(&tag).ok()?;
        Some(AttemptRef { job, attempt })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::time::Timestamp;

    #[test]
    fn a_credential_names_exactly_its_attempt() {
        let key = AttemptKey::generate().unwrap();
        let job = JobId::generate(Timestamp(1));
        let cred = key.credential(&job, 3);
        assert_eq!(
            key.verify(&cred),
            Some(AttemptRef {
                job: job.clone(),
                attempt: 3
            })
        );
        // Another attempt's number, another job, another key, a changed tag: refused.
        let other = JobId::generate(Timestamp(2));
        let forged = [
            cred.replacen(".3.", ".4.", 1),
            cred.replace(job.as_str(), other.as_str()),
            AttemptKey::generate().unwrap().credential(&job, 3),
            flip_last(&cred),
            format!("{cred}.x"),
            String::new(),
            "rat1...".into(),
        ];
        for f in forged {
            assert_eq!(key.verify(&f), None, "{f}");
        }
        assert!(!format!("{key:?}").contains(&hex::encode(key.as_bytes())));
    }

    #[test]
    fn a_vm_credential_names_its_vm_and_is_no_attempt_credential() {
        let key = AttemptKey::generate().unwrap();
        let cred = key.vm_credential("gpu-s0-1a2b3c4d");
        assert_eq!(key.verify_vm(&cred).as_deref(), Some("gpu-s0-1a2b3c4d"));
        assert_eq!(key.verify(&cred), None);
        let job = JobId::generate(Timestamp(1));
        assert_eq!(key.verify_vm(&key.credential(&job, 1)), None);
        for forged in [
            cred.replace("s0", "s1"),
            flip_last(&cred),
            AttemptKey::generate()
                .unwrap()
                .vm_credential("gpu-s0-1a2b3c4d"),
            format!("{cred}.x"),
            "rvm1..".into(),
        ] {
            assert_eq!(key.verify_vm(&forged), None, "{forged}");
        }
    }

    fn flip_last(s: &str) -> String {
        let (head, last) = s.split_at(s.len() - 1);
        format!("{head}{}", if last == "0" { "1" } else { "0" })
    }
}

/// What an agent reads from `<vm dir>/credentials` (mode 0600) and then deletes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentCredentials {
    /// The broker's API.
    pub api: String,
    /// The attempt credential ([`AttemptKey::credential`]).
    pub token: String,
}
