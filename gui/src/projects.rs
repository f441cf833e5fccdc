//! Trusting a project: by its publisher key, or by a signed machine-type file whose signature is
//! checked and whose details are shown before the owner says yes.

use std::path::Path;

use gleaner::{Envelope, MachineType, PublicKey};

use crate::status::duration_words;

/// A signed machine-type file, opened and verified, with what the owner should see before trusting.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub publisher: String,
    /// The signed file's bytes, hex (what `Trust { machine_type_hex }` carries).
    pub file_hex: String,
    pub digest: String,
    /// (label, value) lines for the details panel.
    pub details: Vec<(String, String)>,
    /// A warning the owner should read (expired, or not yet valid).
    pub warning: Option<String>,
}

/// A publisher id typed by the owner.
pub fn parse_key(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("paste the project's publisher key".into());
    }
    t.parse::<PublicKey>()
        .map(|k| k.to_string())
        .map_err(|e| format!("not a publisher key: {e}"))
}

/// A share typed by the owner: a positive number.
pub fn parse_share(text: &str) -> Result<f64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(1.0);
    }
    match t.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!(
            "{t:?}: a share is a positive number, like 1 or 0.5"
        )),
    }
}

/// Opens a signed machine-type file and checks its signature (not yet whether it is trusted).
pub fn open_file(path: &Path, now: u64) -> Result<Candidate, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    open_bytes(&bytes, now).map_err(|e| format!("{}: {e}", path.display()))
}

/// As [`open_file`], from the bytes.
pub fn open_bytes(bytes: &[u8], now: u64) -> Result<Candidate, String> {
    let v = Envelope::open_bytes::<MachineType>(bytes)
        .map_err(|e| format!("not a valid signed machine type: {e}"))?;
    let mt = &v.message;
    let warning = mt.check_fresh(now).err().map(|e| e.to_string());
    let image = mt
        .image
        .as_ref()
        .map(|b| format!("{} (sha256 {})", b.url, short(&b.sha256.to_string())))
        .unwrap_or_else(|| "none".into());
    let mut details = vec![
        ("Name".to_owned(), format!("{} v{}", mt.name, mt.version)),
        ("Publisher".to_owned(), v.signer.to_string()),
        (
            "Backend".to_owned(),
            format!("{:?}", mt.backend).to_lowercase(),
        ),
        ("Image".to_owned(), image),
        (
            "Cores".to_owned(),
            if mt.cores_min == mt.cores_max {
                mt.cores_min.to_string()
            } else {
                format!("{} to {}", mt.cores_min, mt.cores_max)
            },
        ),
        (
            "Memory / disk".to_owned(),
            format!("{} MiB / {} MiB", mt.memory_mib, mt.disk_mib),
        ),
        (
            "Longest run".to_owned(),
            duration_words(u64::from(mt.max_wallclock_s)),
        ),
        (
            "Network".to_owned(),
            if mt.egress.is_empty() {
                "no outbound access".to_owned()
            } else {
                mt.egress.join(", ")
            },
        ),
        (
            "Credit weight".to_owned(),
            format!("{:.2}", f64::from(mt.weight_milli) / 1000.0),
        ),
        (
            "Valid until".to_owned(),
            if mt.not_after > now {
                format!("{} from now", duration_words(mt.not_after - now))
            } else {
                "expired".to_owned()
            },
        ),
        ("Fingerprint".to_owned(), short(&v.digest.to_string())),
    ];
    if !mt.description.is_empty() {
        details.insert(1, ("About".to_owned(), mt.description.clone()));
    }
    Ok(Candidate {
        publisher: v.signer.to_string(),
        file_hex: hex::encode(bytes),
        digest: v.digest.to_string(),
        details,
        warning,
    })
}

fn short(s: &str) -> String {
    if s.len() > 16 {
        format!("{}…", &s[..16])
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::SecretKey;

    #[test]
    fn a_signed_file_shows_its_details_and_a_tampered_one_is_refused() {
        let key = SecretKey::from_seed([3; 32]);
        let mut mt = MachineType::example(key.public());
        mt.name = "lhcb-sim".into();
        mt.not_after = 2_000;
        let bytes = Envelope::seal(&mt, &key).to_bytes();
        let c = open_bytes(&bytes, 1_000).unwrap();
        assert_eq!(c.publisher, key.public().to_string());
        assert!(c.details.iter().any(|(_, v)| v.starts_with("lhcb-sim v")));
        assert!(c.warning.is_none());
        assert!(open_bytes(&bytes, 3_000).unwrap().warning.is_some());
        let mut bad = bytes.clone();
        let n = bad.len() - 1;
        bad[n] ^= 1;
        assert!(open_bytes(&bad, 1_000).is_err());
    }

    #[test]
    fn keys_and_shares() {
        let key = SecretKey::from_seed([4; 32]).public().to_string();
        assert_eq!(parse_key(&format!(" {key} ")).unwrap(), key);
        assert!(parse_key("not-a-key").is_err());
        assert_eq!(parse_share("").unwrap(), 1.0);
        assert_eq!(parse_share("0.5").unwrap(), 0.5);
        assert!(parse_share("-1").is_err());
    }
}
