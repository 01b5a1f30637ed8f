//! A reader of the protocol-0 pickles MXNet sends in `kController` (the server-side
//! optimizer, `wire/optimizers/`): it builds a value tree and never executes anything.
//!
//! Why not `serde-pickle`: it reads the fixtures' state dicts (with
//! `replace_unresolved_globals`) but drops the class names, and the class is exactly what
//! the split decision needs (DESIGN.md §7). This reader knows the opcodes the fixtures use
//! (`c ( d l t V S I F L N p g s a R b .`) and the one object form they use,
//! `copy_reg._reconstructor(<class>, object, None)` followed by BUILD with its state;
//! anything else is an error, which the caller reads as "do not split".

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Largest pickle accepted (an optimizer is well under 4 KiB).
pub const MAX_PICKLE_LEN: usize = 64 * 1024;
/// Deepest nesting accepted (also ends cycles made with the memo).
pub const MAX_DEPTH: usize = 32;

/// A value read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `I00` / `I01`.
    Bool(bool),
    /// `I<n>` or `L<n>L` (within i64).
    Int(i64),
    /// `F<x>`.
    Float(f64),
    /// `V` or `S` strings.
    Str(String),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A class or function named by module and name (never resolved).
    Global {
        /// Module path.
        module: String,
        /// Name in the module.
        name: String,
    },
    /// An instance made by `copy_reg._reconstructor(class, object, None)`, with the state
    /// BUILD gave it.
    Object {
        /// Module path of its class.
        module: String,
        /// Class name.
        class: String,
        /// Its state (a dict for optimizers).
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }
}

/// Why a pickle is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickleError {
    /// Longer than [`MAX_PICKLE_LEN`].
    #[error("pickle of {0} bytes is over the limit")]
    TooLong(usize),
    /// An opcode this reader does not know.
    #[error("opcode {0:#04x} at byte {1} is not understood")]
    Opcode(u8, usize),
    /// A line argument that does not parse.
    #[error("bad argument of opcode {0:?} at byte {1}")]
    Argument(char, usize),
    /// The input ended before STOP.
    #[error("pickle ends before STOP")]
    Truncated,
    /// Stack, mark or memo misuse.
    #[error("malformed pickle: {0}")]
    Malformed(&'static str),
    /// A REDUCE other than `copy_reg._reconstructor(class, object, None)`.
    #[error("call of {0} is not understood")]
    Call(String),
    /// Nesting deeper than [`MAX_DEPTH`], or a cycle.
    #[error("nesting deeper than {MAX_DEPTH} (or a cycle)")]
    TooDeep,
}

/// A value on the machine's stack: containers are shared so that the memo sees later
/// SETITEMs and APPENDs, as Python's would.
#[derive(Debug, Clone)]
enum Item {
    Scalar(Value),
    Tuple(Rc<Vec<Item>>),
    List(Rc<RefCell<Vec<Item>>>),
    Dict(Rc<RefCell<Vec<(Item, Item)>>>),
    Object(Rc<RefCell<(String, String, Option<Item>)>>),
}

fn line(input: &[u8], pos: usize, op: char) -> Result<(&str, usize), PickleError> {
    let rest = &input[pos..];
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(PickleError::Truncated)?;
    let text = std::str::from_utf8(&rest[..end]).map_err(|_| PickleError::Argument(op, pos))?;
    Ok((text, pos + end + 1))
}

/// `raw-unicode-escape`: `\uXXXX` and `\UXXXXXXXX` escapes, every other byte as is.
fn unicode(text: &str, pos: usize) -> Result<String, PickleError> {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let width = match (c, chars.peek()) {
            ('\\', Some('u')) => 4,
            ('\\', Some('U')) => 8,
            _ => {
                out.push(c);
                continue;
            }
        };
        chars.next();
        let hex: String = chars.by_ref().take(width).collect();
        let ch = u32::from_str_radix(&hex, 16)
            .ok()
            .filter(|_| hex.len() == width)
            .and_then(char::from_u32)
            .ok_or(PickleError::Argument('V', pos))?;
        out.push(ch);
    }
    Ok(out)
}

/// `S'...'`: a quoted repr with only simple escapes accepted.
fn quoted(text: &str, pos: usize) -> Result<String, PickleError> {
    let bad = PickleError::Argument('S', pos);
    let inner = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .or_else(|| text.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
        .ok_or(bad.clone())?;
    if inner.contains('\\') {
        return Err(bad);
    }
    Ok(inner.to_string())
}

fn pop(stack: &mut Vec<Item>) -> Result<Item, PickleError> {
    stack
        .pop()
        .ok_or(PickleError::Malformed("pop from an empty stack"))
}

fn since_mark(stack: &mut Vec<Item>, marks: &mut Vec<usize>) -> Result<Vec<Item>, PickleError> {
    let m = marks.pop().ok_or(PickleError::Malformed("no mark"))?;
    if m > stack.len() {
        return Err(PickleError::Malformed("mark past the stack"));
    }
    Ok(stack.split_off(m))
}

/// Reads a protocol-0 pickle into a value tree, executing nothing.
pub fn read_pickle(input: &[u8]) -> Result<Value, PickleError> {
    if input.len() > MAX_PICKLE_LEN {
        return Err(PickleError::TooLong(input.len()));
    }
    let mut containers = Vec::new();
    let result = read(input, &mut containers);
    // A pickle can make a container hold itself (through the memo): empty every
    // container so that no reference cycle outlives the read (found by fuzzing: a leak).
    for c in containers {
        match c {
            Item::List(l) => l.borrow_mut().clear(),
            Item::Dict(d) => d.borrow_mut().clear(),
            Item::Object(o) => o.borrow_mut().2 = None,
            Item::Scalar(_) | Item::Tuple(_) => {}
        }
    }
    result
}

/// Reads a pickle; every mutable container it makes is also put in `containers`.
fn read(input: &[u8], containers: &mut Vec<Item>) -> Result<Value, PickleError> {
    let mut stack: Vec<Item> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Item> = HashMap::new();
    let mut pos = 0;
    loop {
        let &op = input.get(pos).ok_or(PickleError::Truncated)?;
        let at = pos;
        pos += 1;
        match op {
            b'.' => {
                let top = pop(&mut stack)?;
                if !stack.is_empty() || !marks.is_empty() {
                    return Err(PickleError::Malformed("items left at STOP"));
                }
                return resolve(&top, 0);
            }
            b'(' => marks.push(stack.len()),
            b'N' => stack.push(Item::Scalar(Value::None)),
            b'c' => {
                let (module, p) = line(input, pos, 'c')?;
                let (name, p) = line(input, p, 'c')?;
                pos = p;
                stack.push(Item::Scalar(Value::Global {
                    module: module.to_string(),
                    name: name.to_string(),
                }));
            }
            b'V' | b'S' | b'I' | b'F' | b'L' | b'p' | b'g' => {
                let (text, p) = line(input, pos, op as char)?;
                pos = p;
                let bad = || PickleError::Argument(op as char, at);
                match op {
                    b'V' => stack.push(Item::Scalar(Value::Str(unicode(text, at)?))),
                    b'S' => stack.push(Item::Scalar(Value::Str(quoted(text, at)?))),
                    b'I' => stack.push(Item::Scalar(match text {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => Value::Int(t.parse().map_err(|_| bad())?),
                    })),
                    b'L' => {
                        let digits = text.strip_suffix('L').unwrap_or(text);
                        stack.push(Item::Scalar(Value::Int(digits.parse().map_err(|_| bad())?)));
                    }
                    b'F' => {
                        stack.push(Item::Scalar(Value::Float(text.parse().map_err(|_| bad())?)))
                    }
                    b'p' => {
                        let n = text.parse().map_err(|_| bad())?;
                        let top = stack.last().ok_or(PickleError::Malformed("put on empty"))?;
                        memo.insert(n, top.clone());
                    }
                    _ => {
                        let n: u64 = text.parse().map_err(|_| bad())?;
                        let item = memo
                            .get(&n)
                            .ok_or(PickleError::Malformed("get of an unknown memo entry"))?;
                        stack.push(item.clone());
                    }
                }
            }
            b'd' => {
                let items = since_mark(&mut stack, &mut marks)?;
                if items.len() % 2 != 0 {
                    return Err(PickleError::Malformed("odd dict items"));
                }
                let mut pairs = Vec::new();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                let dict = Item::Dict(Rc::new(RefCell::new(pairs)));
                containers.push(dict.clone());
                stack.push(dict);
            }
            b'l' => {
                let items = since_mark(&mut stack, &mut marks)?;
                let list = Item::List(Rc::new(RefCell::new(items)));
                containers.push(list.clone());
                stack.push(list);
            }
            b't' => {
                let items = since_mark(&mut stack, &mut marks)?;
                stack.push(Item::Tuple(Rc::new(items)));
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last() {
                    Some(Item::Dict(d)) => d.borrow_mut().push((k, v)),
                    _ => return Err(PickleError::Malformed("SETITEM on a non-dict")),
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last() {
                    Some(Item::List(l)) => l.borrow_mut().push(v),
                    _ => return Err(PickleError::Malformed("APPEND on a non-list")),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                let object = reconstruct(&callable, &args)?;
                containers.push(object.clone());
                stack.push(object);
            }
            b'b' => {
                let state = pop(&mut stack)?;
                match stack.last() {
                    Some(Item::Object(o)) if o.borrow().2.is_none() => {
                        o.borrow_mut().2 = Some(state)
                    }
                    _ => {
                        return Err(PickleError::Malformed(
                            "BUILD on something other than a new object",
                        ))
                    }
                }
            }
            other => return Err(PickleError::Opcode(other, at)),
        }
    }
}

fn global(item: &Item) -> Option<(&str, &str)> {
    match item {
        Item::Scalar(Value::Global { module, name }) => Some((module, name)),
        _ => None,
    }
}

/// The one call understood: `copy_reg._reconstructor(class, object, None)`.
fn reconstruct(callable: &Item, args: &Item) -> Result<Item, PickleError> {
    let described = || match global(callable) {
        Some((m, n)) => format!("{m}.{n}"),
        None => "a non-global".to_string(),
    };
    if global(callable) != Some(("copy_reg", "_reconstructor")) {
        return Err(PickleError::Call(described()));
    }
    let Item::Tuple(a) = args else {
        return Err(PickleError::Call(described()));
    };
    match (
        a.first().and_then(global),
        a.get(1).and_then(global),
        a.get(2),
        a.len(),
    ) {
        (
            Some((module, class)),
            Some(("__builtin__", "object")),
            Some(Item::Scalar(Value::None)),
            3,
        ) => Ok(Item::Object(Rc::new(RefCell::new((
            module.to_string(),
            class.to_string(),
            None,
        ))))),
        _ => Err(PickleError::Call(described())),
    }
}

fn resolve(item: &Item, depth: usize) -> Result<Value, PickleError> {
    if depth > MAX_DEPTH {
        return Err(PickleError::TooDeep);
    }
    let all = |items: &[Item]| -> Result<Vec<Value>, PickleError> {
        items.iter().map(|i| resolve(i, depth + 1)).collect()
    };
    Ok(match item {
        Item::Scalar(v) => v.clone(),
        Item::Tuple(t) => Value::Tuple(all(t)?),
        Item::List(l) => Value::List(all(&l.borrow())?),
        Item::Dict(d) => Value::Dict(
            d.borrow()
                .iter()
                .map(|(k, v)| Ok((resolve(k, depth + 1)?, resolve(v, depth + 1)?)))
                .collect::<Result<_, PickleError>>()?,
        ),
        Item::Object(o) => {
            let o = o.borrow();
            Value::Object {
                module: o.0.clone(),
                class: o.1.clone(),
                state: o
                    .2
                    .as_ref()
                    .map(|s| resolve(s, depth + 1).map(Box::new))
                    .transpose()?,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copied from `../shared/wire/optimizers`, so that a fresh clone has them.
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/optimizers/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).expect("fixture")
    }

    fn object(v: &Value) -> (&str, &str, &Value) {
        match v {
            Value::Object {
                module,
                class,
                state: Some(state),
            } => (module, class, state),
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn the_fixtures_read_with_their_class_and_state() {
        for (file, class, idx2name_len) in [
            ("gluon-sgd.pickle", "SGD", 0),
            ("gluon-adam.pickle", "Adam", 0),
            ("gluon-lamb.pickle", "LAMB", 0),
            ("gluon-sgd-multiprecision-lrsched.pickle", "SGD", 0),
            ("module-sgd.pickle", "SGD", 2),
        ] {
            let v = read_pickle(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let (module, c, state) = object(&v);
            assert_eq!((module, c), ("mxnet.optimizer.optimizer", class), "{file}");
            match state.get("idx2name") {
                Some(Value::Dict(d)) => assert_eq!(d.len(), idx2name_len, "{file}"),
                other => panic!("{file}: idx2name {other:?}"),
            }
        }
        let v = read_pickle(&fixture("gluon-sgd-multiprecision-lrsched.pickle")).unwrap();
        let (_, _, state) = object(&v);
        assert_eq!(state.get("multi_precision"), Some(&Value::Bool(true)));
        let (module, class, sched) = object(state.get("lr_scheduler").unwrap());
        assert_eq!((module, class), ("mxnet.lr_scheduler", "FactorScheduler"));
        assert_eq!(sched.get("factor"), Some(&Value::Float(0.9)));
        let v = read_pickle(&fixture("module-sgd.pickle")).unwrap();
        let (_, _, state) = object(&v);
        assert_eq!(
            state.get("wd_mult"),
            Some(&Value::Dict(vec![(
                Value::Str("fc_bias".into()),
                Value::Float(0.0)
            )]))
        );
        // `I1 g14`: the memo hands back the name stored earlier.
        let Some(Value::Dict(idx)) = state.get("idx2name") else {
            panic!()
        };
        assert_eq!(idx[1], (Value::Int(1), Value::Str("fc_bias".into())));
    }

    #[test]
    fn the_memo_sees_later_additions() {
        // A dict appended to a list while empty, then fetched from the memo, filled and
        // appended again: both places show the item (Python's aliasing).
        let p = b"(lp0\n(dp1\nag1\nVk\nI1\nsa.";
        let v = read_pickle(p).unwrap();
        let want = Value::Dict(vec![(Value::Str("k".into()), Value::Int(1))]);
        assert_eq!(v, Value::List(vec![want.clone(), want]));
    }

    #[test]
    fn anything_else_is_not_understood() {
        assert_eq!(
            read_pickle(b"cos\nsystem\n(Vls\ntR."),
            Err(PickleError::Call("os.system".into()))
        );
        assert_eq!(read_pickle(b"}."), Err(PickleError::Opcode(b'}', 0)));
        assert_eq!(read_pickle(b"(dp0\nVa\n"), Err(PickleError::Truncated));
        assert_eq!(read_pickle(b"I12x\n."), Err(PickleError::Argument('I', 0)));
        assert_eq!(
            read_pickle(b"(dp0\nVa\ng0\ns."),
            Err(PickleError::TooDeep),
            "a dict containing itself"
        );
        assert_eq!(
            read_pickle(&vec![b'('; MAX_PICKLE_LEN + 1]),
            Err(PickleError::TooLong(MAX_PICKLE_LEN + 1))
        );
        assert_eq!(
            read_pickle(b"NN."),
            Err(PickleError::Malformed("items left at STOP"))
        );
        assert_eq!(
            read_pickle(b"s."),
            Err(PickleError::Malformed("pop from an empty stack"))
        );
    }

    #[test]
    fn every_truncation_of_a_fixture_is_refused() {
        let p = fixture("gluon-sgd.pickle");
        for cut in 0..p.len() {
            assert!(read_pickle(&p[..cut]).is_err(), "cut {cut}");
        }
    }
}
