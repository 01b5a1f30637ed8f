//! A model as the simulator sees it: layers in forward order with their share of the
//! compute, and each pushed parameter's MXNet key and bytes (`bench/profiles/*.json`,
//! written by `bench/export_models.py` from the traces the training benchmark runs).

use serde::Deserialize;

/// One pushed parameter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    /// Its MXNet key (Gluon: the index in the name-sorted parameter list).
    pub key: u64,
    /// Bytes (float32).
    pub bytes: u64,
}

/// One layer, in forward order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Its block's name.
    pub name: String,
    /// Its share of the iteration's FLOPs.
    pub flops_share: f64,
    /// Its pushed parameters.
    pub params: Vec<Param>,
}

/// A model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Its name.
    pub model: String,
    /// The tensor scale it was exported at.
    pub scale: f64,
    /// Layers in forward order.
    pub layers: Vec<Layer>,
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Not JSON of the expected shape.
    #[error("not a model profile: {0}")]
    Parse(#[from] serde_json::Error),
    /// A key appears twice, or a share is negative, or nothing is pushed.
    #[error("bad model profile: {0}")]
    Invalid(String),
}

impl Profile {
    /// Parses and checks a profile.
    pub fn parse(text: &str) -> Result<Profile, ProfileError> {
        let p: Profile = serde_json::from_str(text)?;
        let mut keys = std::collections::HashSet::new();
        for l in &p.layers {
            if !(0.0..=1.0).contains(&l.flops_share) {
                return Err(ProfileError::Invalid(format!(
                    "layer {}: flops_share {}",
                    l.name, l.flops_share
                )));
            }
            for q in &l.params {
                if !keys.insert(q.key) {
                    return Err(ProfileError::Invalid(format!("key {} twice", q.key)));
                }
                if q.bytes == 0 {
                    return Err(ProfileError::Invalid(format!("key {}: 0 bytes", q.key)));
                }
            }
        }
        if keys.is_empty() {
            return Err(ProfileError::Invalid("no pushed parameter".into()));
        }
        Ok(p)
    }

    /// Bytes pushed per worker and iteration.
    pub fn pushed_bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.params)
            .map(|p| p.bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let dup = r#"{"model":"m","scale":1,"layers":[{"name":"a","flops_share":0.5,"params":[{"key":1,"bytes":4}]},{"name":"b","flops_share":0.5,"params":[{"key":1,"bytes":4}]}]}"#;
        assert_eq!(
            Profile::parse(dup).unwrap_err().to_string(),
            "bad model profile: key 1 twice"
        );
        let empty = r#"{"model":"m","scale":1,"layers":[]}"#;
        assert_eq!(
            Profile::parse(empty).unwrap_err().to_string(),
            "bad model profile: no pushed parameter"
        );
        let share =
            r#"{"model":"m","scale":1,"layers":[{"name":"a","flops_share":-1,"params":[]}]}"#;
        assert!(Profile::parse(share)
            .unwrap_err()
            .to_string()
            .contains("flops_share -1"));
        assert!(Profile::parse("{}")
            .unwrap_err()
            .to_string()
            .starts_with("not a model profile"));
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/bench/profiles/vgg19.json"
        ))
        .unwrap();
        assert_eq!(Profile::parse(&shipped).unwrap().pushed_bytes(), 57_466_908);
    }
}
