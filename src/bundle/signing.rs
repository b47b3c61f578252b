//! ed25519 signatures for bundles (ed25519-dalek): `keygen` writes a PKCS#8
//! private key (mode 0600) and its SPKI public key, both PEM, so OpenSSL and
//! other tools read them too; `export --sign-key` signs the exact bytes of
//! `manifest.json`, and `import --trust-key` accepts only a bundle whose
//! signature that public key verifies.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Key files are a few hundred bytes; anything far larger is not one.
const KEY_FILE_MAX: u64 = 16 * 1024;

/// The content of `manifest.sig`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub algorithm: String,
    /// Hex of the signer's public key, so a refusal can say who signed.
    pub public_key: String,
    /// Hex of the 64-byte signature of `manifest.json`.
    pub signature: String,
}

/// Write a new key pair: `path` (private, 0600, must not exist) and `path.pub`.
pub fn keygen(path: &Path) -> anyhow::Result<PathBuf> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the private key")?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .context("encoding the public key")?;
    let pub_path = PathBuf::from(format!("{}.pub", path.display()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| {
        format!(
            "could not create {} (it must not exist yet)",
            path.display()
        )
    })?;
    file.write_all(private.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("could not write {}", path.display()))?;
    std::fs::write(&pub_path, public.as_bytes())
        .with_context(|| format!("could not write {}", pub_path.display()))?;
    Ok(pub_path)
}

fn read_key_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?
        .len();
    if len > KEY_FILE_MAX {
        bail!("{what} {} is too large to be a key", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Sign `manifest` with the private key in `key_path`.
pub fn sign(manifest: &[u8], key_path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read_key_file(key_path, "signing key")?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an ed25519 private key in PKCS#8 PEM: {e}",
            key_path.display()
        )
    })?;
    let signature = key.sign(manifest);
    let file = SignatureFile {
        algorithm: "ed25519".into(),
        public_key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(signature.to_bytes()),
    };
    Ok(serde_json::to_vec_pretty(&file)?)
}

/// Load a trusted public key.
pub fn trusted_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let pem = read_key_file(path, "trusted key")?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an ed25519 public key in PEM: {e}",
            path.display()
        )
    })
}

/// Check `signature` (the bytes of `manifest.sig`) over `manifest` with `trusted`.
pub fn verify(manifest: &[u8], signature: &[u8], trusted: &VerifyingKey) -> anyhow::Result<()> {
    let file: SignatureFile =
        serde_json::from_slice(signature).context("manifest.sig is not a signature file")?;
    if file.algorithm != "ed25519" {
        bail!("manifest.sig uses `{}`, not ed25519", file.algorithm);
    }
    let bytes: [u8; 64] = hex::decode(&file.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("manifest.sig holds no 64-byte signature")?;
    let signature = Signature::from_bytes(&bytes);
    if file.public_key != hex::encode(trusted.as_bytes()) {
        bail!(
            "the bundle is signed by key {}, not by the trusted key {}",
            file.public_key,
            hex::encode(trusted.as_bytes())
        );
    }
    trusted.verify(manifest, &signature).map_err(|_| {
        anyhow::anyhow!("the signature of manifest.json does not verify with the trusted key")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse_other_keys_and_edits() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let a_pub = keygen(&a).unwrap();
        let b_pub = keygen(&b).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(keygen(&a).is_err(), "an existing key was overwritten");
        let sig = sign(b"manifest", &a).unwrap();
        verify(b"manifest", &sig, &trusted_key(&a_pub).unwrap()).unwrap();
        assert!(verify(b"manifesT", &sig, &trusted_key(&a_pub).unwrap()).is_err());
        let e = verify(b"manifest", &sig, &trusted_key(&b_pub).unwrap()).unwrap_err();
        assert!(e.to_string().contains("not by the trusted key"), "{e}");
    }
}
