//! The verdict on a server-side optimizer (DESIGN.md §7): may the keys it updates be
//! split? Read from the `kController` pickle, never executed.
//!
//! The allowlist is exact class paths, each checked bitwise with MXNet 1.9.1's own
//! `Updater` (whole key vs slice keys) by `tests/e2e/test_optimizer_allowlist.py`, so the
//! list cannot drift from the truth. Per-key multipliers (`idx2name`, `lr_mult`,
//! `wd_mult`: Module's way) are looked up by MXNet key, which a slice key does not have.

use p3proxy_parsers::pickle::{read_pickle, Value};

/// Optimizers whose update is elementwise with one learning rate and weight decay per
/// key, so that updating slices equals updating the whole key.
pub const ALLOWED_OPTIMIZERS: [&str; 10] = [
    "mxnet.optimizer.optimizer.SGD",
    "mxnet.optimizer.optimizer.NAG",
    "mxnet.optimizer.optimizer.Adam",
    "mxnet.optimizer.optimizer.AdaGrad",
    "mxnet.optimizer.optimizer.RMSProp",
    "mxnet.optimizer.optimizer.AdaDelta",
    "mxnet.optimizer.optimizer.Ftrl",
    "mxnet.optimizer.optimizer.Adamax",
    "mxnet.optimizer.optimizer.Signum",
    "mxnet.optimizer.optimizer.FTML",
];

/// Learning-rate schedules: they follow the global update count, which every slice
/// advances once per round like the whole key.
/// (The abstract base `LRScheduler` is not one: its `__call__` raises.)
pub const ALLOWED_SCHEDULERS: [&str; 4] = [
    "mxnet.lr_scheduler.FactorScheduler",
    "mxnet.lr_scheduler.MultiFactorScheduler",
    "mxnet.lr_scheduler.PolyScheduler",
    "mxnet.lr_scheduler.CosineScheduler",
];

/// Why an optimizer forbids splitting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptimizerRefusal {
    /// The pickle is not one this reader understands.
    #[error("optimizer pickle not understood: {0}")]
    Unreadable(String),
    /// Its class is not on the allowlist (LAMB, Nadam, contrib, ...).
    #[error("optimizer {0} is not known to update slices like the whole key")]
    NotAllowed(String),
    /// Per-key multipliers or names (Module's optimizer).
    #[error("optimizer {class} has per-key {field}")]
    Multipliers {
        /// Its class path.
        class: String,
        /// The non-empty field.
        field: &'static str,
    },
    /// An object in its state that is not an allowlisted schedule.
    #[error("optimizer {class} carries {object} in its state")]
    UnknownState {
        /// Its class path.
        class: String,
        /// The unexpected object's class path.
        object: String,
    },
}

impl OptimizerRefusal {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            OptimizerRefusal::Unreadable(_) => "optimizer_unreadable",
            OptimizerRefusal::NotAllowed(_) => "optimizer_not_allowed",
            OptimizerRefusal::Multipliers { .. } => "optimizer_multipliers",
            OptimizerRefusal::UnknownState { .. } => "optimizer_state",
        }
    }
}

/// Per-key fields that must be empty: the server would apply them by MXNet key.
const PER_KEY_FIELDS: [&str; 4] = ["idx2name", "lr_mult", "wd_mult", "param_dict"];

/// The optimizers a proxy lets split keys: all of `ALLOWED_OPTIMIZERS`, or a subset the
/// operator chose (`split_optimizers`). Never more: a class outside the list has not been
/// checked to update slices like the whole key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptimizerSet(u16);

impl OptimizerSet {
    /// Every allowlisted optimizer.
    pub const ALL: OptimizerSet = OptimizerSet((1 << ALLOWED_OPTIMIZERS.len()) - 1);
    /// No optimizer: nothing is split.
    pub const NONE: OptimizerSet = OptimizerSet(0);

    /// The set of these class names, each either the full path
    /// (`mxnet.optimizer.optimizer.SGD`) or the class alone (`SGD`); the first name that
    /// is not allowlisted is the error.
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<OptimizerSet, String> {
        let mut bits = 0u16;
        for name in names {
            let index = ALLOWED_OPTIMIZERS
                .iter()
                .position(|path| *path == name || path.rsplit('.').next() == Some(name))
                .ok_or_else(|| name.to_string())?;
            bits |= 1 << index;
        }
        Ok(OptimizerSet(bits))
    }

    /// Whether the class path is in the set.
    pub fn contains(self, path: &str) -> bool {
        ALLOWED_OPTIMIZERS
            .iter()
            .position(|p| *p == path)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

/// The class path of an allowlisted optimizer, or why it is refused.
pub fn optimizer_verdict(pickle: &[u8]) -> Result<String, OptimizerRefusal> {
    optimizer_verdict_in(pickle, OptimizerSet::ALL)
}

/// `optimizer_verdict` against the operator's subset of the allowlist.
pub fn optimizer_verdict_in(
    pickle: &[u8],
    allowed: OptimizerSet,
) -> Result<String, OptimizerRefusal> {
    let value = read_pickle(pickle).map_err(|e| OptimizerRefusal::Unreadable(e.to_string()))?;
    let Value::Object {
        module,
        class,
        state,
    } = &value
    else {
        return Err(OptimizerRefusal::Unreadable("not an object".into()));
    };
    let path = format!("{module}.{class}");
    if !allowed.contains(&path) {
        return Err(OptimizerRefusal::NotAllowed(path));
    }
    let Some(Value::Dict(items)) = state.as_deref() else {
        return Err(OptimizerRefusal::Unreadable(format!(
            "{path} has no state dict"
        )));
    };
    for field in ["idx2name", "lr_mult", "wd_mult"] {
        if state.as_deref().and_then(|s| s.get(field)).is_none() {
            return Err(OptimizerRefusal::Unreadable(format!(
                "{path} has no {field}"
            )));
        }
    }
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(OptimizerRefusal::Unreadable(format!(
                "{path}: a state key is not a string"
            )));
        };
        if PER_KEY_FIELDS.contains(&name.as_str()) {
            let empty = matches!(v, Value::Dict(d) if d.is_empty()) || matches!(v, Value::None);
            if !empty {
                let field = PER_KEY_FIELDS
                    .into_iter()
                    .find(|f| f == name)
                    .expect("listed");
                return Err(OptimizerRefusal::Multipliers { class: path, field });
            }
        }
        if name == "lr_scheduler" {
            match v {
                Value::None => {}
                Value::Object {
                    module,
                    class,
                    state,
                } => {
                    let sched = format!("{module}.{class}");
                    if !ALLOWED_SCHEDULERS.contains(&sched.as_str()) {
                        return Err(OptimizerRefusal::UnknownState {
                            class: path,
                            object: sched,
                        });
                    }
                    if let Some(s) = state {
                        no_objects(s, &path)?;
                    }
                }
                other => no_objects(other, &path)?,
            }
        } else {
            no_objects(v, &path)?;
        }
    }
    Ok(path)
}

/// Refuses any object or global inside `v`: state this module does not know.
fn no_objects(v: &Value, class: &str) -> Result<(), OptimizerRefusal> {
    let unknown = |object: String| OptimizerRefusal::UnknownState {
        class: class.to_string(),
        object,
    };
    match v {
        Value::Object { module, class, .. } => Err(unknown(format!("{module}.{class}"))),
        Value::Global { module, name } => Err(unknown(format!("{module}.{name}"))),
        Value::Tuple(xs) | Value::List(xs) => xs.iter().try_for_each(|x| no_objects(x, class)),
        Value::Dict(items) => items.iter().try_for_each(|(k, x)| {
            no_objects(k, class)?;
            no_objects(x, class)
        }),
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/parsers/tests/optimizers/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).expect("fixture")
    }

    #[test]
    fn the_fixtures_get_the_verdicts_of_their_readme() {
        for split in [
            "gluon-sgd.pickle",
            "gluon-adam.pickle",
            "gluon-sgd-multiprecision-lrsched.pickle",
        ] {
            assert!(optimizer_verdict(&fixture(split)).is_ok(), "{split}");
        }
        assert_eq!(
            optimizer_verdict(&fixture("gluon-sgd.pickle")),
            Ok("mxnet.optimizer.optimizer.SGD".into())
        );
        assert_eq!(
            optimizer_verdict(&fixture("gluon-lamb.pickle")),
            Err(OptimizerRefusal::NotAllowed(
                "mxnet.optimizer.optimizer.LAMB".into()
            ))
        );
        let module = optimizer_verdict(&fixture("module-sgd.pickle")).unwrap_err();
        assert_eq!(module.label(), "optimizer_multipliers");
        assert!(matches!(
            module,
            OptimizerRefusal::Multipliers {
                field: "idx2name" | "wd_mult",
                ..
            }
        ));
    }

    fn sgd_with(extra: &str) -> Vec<u8> {
        format!(
            "ccopy_reg\n_reconstructor\n(cmxnet.optimizer.optimizer\nSGD\nc__builtin__\nobject\nNtR(dVidx2name\n(dsVlr_mult\n(dsVwd_mult\n(ds{extra}b."
        )
        .into_bytes()
    }

    #[test]
    fn state_beyond_numbers_and_allowed_schedules_is_refused() {
        assert!(optimizer_verdict(&sgd_with("")).is_ok());
        assert!(optimizer_verdict(&sgd_with("Vmomentum\nF0.9\ns")).is_ok());
        let evil = sgd_with("Vx\ncos\nsystem\ns");
        assert_eq!(
            optimizer_verdict(&evil).unwrap_err().label(),
            "optimizer_state"
        );
        let sched = sgd_with(
            "Vlr_scheduler\nccopy_reg\n_reconstructor\n(cmxnet.lr_scheduler\nEvilScheduler\nc__builtin__\nobject\nNtR(dbs",
        );
        assert_eq!(
            optimizer_verdict(&sched),
            Err(OptimizerRefusal::UnknownState {
                class: "mxnet.optimizer.optimizer.SGD".into(),
                object: "mxnet.lr_scheduler.EvilScheduler".into()
            })
        );
        let wd = sgd_with("Vparam_dict\n(dI0\nI1\nss");
        assert_eq!(
            optimizer_verdict(&wd).unwrap_err().label(),
            "optimizer_multipliers"
        );
        // No multipliers field at all: not Gluon's optimizer as the fixtures show it.
        let bare = b"ccopy_reg\n_reconstructor\n(cmxnet.optimizer.optimizer\nSGD\nc__builtin__\nobject\nNtR(db.";
        assert_eq!(
            optimizer_verdict(bare).unwrap_err().label(),
            "optimizer_unreadable"
        );
        assert_eq!(
            optimizer_verdict(b"garbage").unwrap_err().label(),
            "optimizer_unreadable"
        );
    }
}
