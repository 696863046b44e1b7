//! A reader for the subset of Python's pickle format that `torch.save` writes.
//!
//! No maintained Rust crate reads PyTorch pickles without pulling in a whole
//! ML framework (serde-pickle has no persistent ids or custom classes), so this
//! is a small stack machine over the binary opcodes of protocols 2–5. Objects
//! of classes it does not know (optimizer state, config objects) become opaque
//! [`Value::Object`]s that the caller skips; `torch` tensors become
//! [`Value::Tensor`] references into the archive's storages. Every read is
//! bounds-checked: corrupt input is an error, never a panic.

use std::collections::HashMap;

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    /// From a storage class name such as `FloatStorage`.
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// True for floating-point element types.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }
}

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Name of the storage file under `<archive>/data/`.
    pub storage_key: String,
    pub dtype: StorageDtype,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A dict or `OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A reference to a module attribute (`GLOBAL`).
    Global(String, String),
    /// A storage named by a persistent id.
    Storage(StorageDtype, String),
    Tensor(TensorRef),
    /// An instance of a class this reader does not interpret.
    Object(String),
    /// Internal stack marker.
    Mark,
}

/// Deepest nesting of containers a pickle may build. `torch.save` state
/// dicts nest a handful of levels; the limit keeps a hostile file from
/// exhausting the stack (values are dropped recursively).
pub const MAX_DEPTH: u32 = 256;

/// Values one parse may create, copies out of the memo included: a million
/// plus 16 per input byte (without copies a pickle creates at most about one
/// value per opcode). Bounds a "billion laughs" file, whose memo references
/// would otherwise grow tenfold per level.
pub fn value_budget(input_len: usize) -> u64 {
    1_000_000 + 16 * input_len as u64
}

/// Parses a whole pickle; returns the value `STOP` leaves on the stack.
///
/// # Errors
/// A message for corrupt or truncated input, unsupported opcodes, nesting
/// deeper than [`MAX_DEPTH`] or more values than [`value_budget`].
pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    Machine {
        input: bytes,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        created: 0,
        budget: value_budget(bytes.len()),
    }
    .run()
}

/// A value on the stack or in the memo, with its nesting depth and the
/// number of values it holds (itself included), so that copies and nesting
/// are charged before they happen.
#[derive(Clone)]
struct Item {
    value: Value,
    depth: u32,
    nodes: u64,
}

impl Item {
    fn leaf(value: Value) -> Self {
        Self {
            value,
            depth: 1,
            nodes: 1,
        }
    }

    /// A new container `make(values)` holding `items`.
    fn container(items: Vec<Item>, make: impl FnOnce(Vec<Value>) -> Value) -> Self {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        let nodes = 1 + items.iter().map(|i| i.nodes).sum::<u64>();
        Self {
            value: make(items.into_iter().map(|i| i.value).collect()),
            depth,
            nodes,
        }
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// Values created so far, and how many may be.
    created: u64,
    budget: u64,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.input.len())
            .ok_or_else(|| format!("truncated pickle: {n} bytes needed at byte {}", self.pos))?;
        let slice = &self.input[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn len_u64(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|_| "length out of range".to_string())
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "invalid UTF-8 in a string".to_string())
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.input[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("truncated pickle: unterminated line")?;
        let s = String::from_utf8(rest[..end].to_vec()).map_err(|_| "invalid UTF-8")?;
        self.pos += end + 1;
        Ok(s)
    }

    /// Charges `nodes` new values against the budget.
    fn charge(&mut self, nodes: u64) -> Result<(), String> {
        self.created = self.created.saturating_add(nodes);
        if self.created > self.budget {
            return Err(format!(
                "the pickle builds more than {} values (at byte {}); refusing it",
                self.budget, self.pos
            ));
        }
        Ok(())
    }

    fn check_depth(&self, depth: u32) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "values nested deeper than {MAX_DEPTH} levels at byte {}",
                self.pos
            ));
        }
        Ok(())
    }

    /// Pushes a newly made item: one value charged, its depth checked.
    fn push(&mut self, item: Item) -> Result<(), String> {
        self.check_depth(item.depth)?;
        self.charge(1)?;
        self.stack.push(item);
        Ok(())
    }

    fn push_leaf(&mut self, value: Value) -> Result<(), String> {
        self.push(Item::leaf(value))
    }

    fn pop_item(&mut self) -> Result<Item, String> {
        match self.stack.pop() {
            Some(Item {
                value: Value::Mark, ..
            })
            | None => Err(format!("stack underflow at byte {}", self.pos)),
            Some(item) => Ok(item),
        }
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.pop_item().map(|i| i.value)
    }

    fn top(&mut self) -> Result<&mut Item, String> {
        let pos = self.pos;
        match self.stack.last_mut() {
            Some(Item {
                value: Value::Mark, ..
            })
            | None => Err(format!("stack underflow at byte {pos}")),
            Some(item) => Ok(item),
        }
    }

    /// Pops everything above the topmost mark, and the mark.
    fn pop_to_mark(&mut self) -> Result<Vec<Item>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i.value, Value::Mark))
            .ok_or_else(|| format!("no mark on the stack at byte {}", self.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// Moves `items` into the container on top of the stack with `insert`.
    fn extend_top(
        &mut self,
        items: Vec<Item>,
        insert: fn(&mut Value, Vec<Value>) -> Result<(), String>,
    ) -> Result<(), String> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        self.check_depth(depth)?;
        let nodes: u64 = items.iter().map(|i| i.nodes).sum();
        let top = self.top()?;
        top.depth = top.depth.max(depth);
        top.nodes = top.nodes.saturating_add(nodes);
        insert(&mut top.value, items.into_iter().map(|i| i.value).collect())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let nodes = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} not defined"))?
            .nodes;
        self.charge(nodes)?;
        let item = self.memo[&key].clone();
        self.stack.push(item);
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let nodes = self.top()?.nodes;
        self.charge(nodes)?;
        let item = self.top()?.clone();
        self.memo.insert(key, item);
        Ok(())
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item {
                    value: Value::Mark,
                    depth: 0,
                    nodes: 0,
                }),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_to_mark()?;
                }
                b'2' => {
                    let nodes = self.top()?.nodes;
                    self.charge(nodes)?;
                    let item = self.top()?.clone();
                    self.stack.push(item);
                }
                b'N' => self.push_leaf(Value::None)?,
                0x88 => self.push_leaf(Value::Bool(true))?,
                0x89 => self.push_leaf(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_leaf(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_leaf(Value::Int(v.into()))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_leaf(Value::Int(v.into()))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is too large"));
                    }
                    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    self.push_leaf(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push_leaf(Value::Float(v))?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push_leaf(Value::Str(s))?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push_leaf(Value::Str(s))?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.push_leaf(Value::Str(s))?;
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as usize,
                        0x8e => self.len_u64()?,
                        _ => self.u8()? as usize,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push_leaf(Value::Bytes(bytes))?;
                }
                b'}' => self.push_leaf(Value::Dict(Vec::new()))?,
                b']' | 0x8f => self.push_leaf(Value::List(Vec::new()))?, // 0x8f: EMPTY_SET
                b')' => self.push_leaf(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push(Item::container(items, Value::Tuple))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {}", self.pos));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|i| matches!(i.value, Value::Mark)) {
                        return Err(format!("stack underflow at byte {}", self.pos));
                    }
                    self.push(Item::container(items, Value::Tuple))?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_leaf(Value::Global(module, name))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push_leaf(Value::Global(m, n))?,
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b's' => {
                    let v = self.pop_item()?;
                    let k = self.pop_item()?;
                    self.extend_top(vec![k, v], set_items)?;
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    self.extend_top(items, set_items)?;
                }
                b'a' => {
                    let v = self.pop_item()?;
                    self.extend_top(vec![v], append)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_to_mark()?;
                    self.extend_top(items, append)?;
                }
                0x91 => {
                    let items = self.pop_to_mark()?;
                    self.push(Item::container(items, Value::List))?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push_leaf(persistent_load(pid)?)?;
                }
                b'R' => {
                    let args = self.pop_item()?;
                    let func = self.pop()?;
                    // The result is at most as deep and large as its arguments.
                    let (depth, nodes) = (args.depth, args.nodes);
                    let value = reduce(func, args.value)?;
                    self.push(Item {
                        value,
                        depth,
                        nodes,
                    })?;
                }
                0x81 => {
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    self.push_leaf(Value::Object(describe(&class)))?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    self.push_leaf(Value::Object(describe(&class)))?;
                }
                b'b' => {
                    // BUILD sets instance state; tensors and dicts need none of it.
                    self.pop()?;
                    self.top()?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ));
                }
            }
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Global(m, n) => format!("{m}.{n}"),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

fn set_items(target: &mut Value, items: Vec<Value>) -> Result<(), String> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    match target {
        Value::Dict(entries) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                entries.push((k, v));
            }
            Ok(())
        }
        // Items set on an object of an unknown class are dropped with it.
        Value::Object(_) => Ok(()),
        other => Err(format!("SETITEM on a non-dict {}", describe(other))),
    }
}

fn append(target: &mut Value, items: Vec<Value>) -> Result<(), String> {
    if let Value::List(list) = target {
        list.extend(items);
    }
    // Appends to objects of unknown classes are dropped with them.
    Ok(())
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(parts) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match parts.as_slice() {
        [
            Value::Str(kind),
            Value::Global(_, class),
            Value::Str(key),
            ..,
        ] if kind == "storage" => {
            let dtype = StorageDtype::from_class(class)
                .ok_or_else(|| format!("unsupported storage type {class}"))?;
            Ok(Value::Storage(dtype, key.clone()))
        }
        _ => Err("unrecognised persistent id".into()),
    }
}

fn as_usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    let Value::Tuple(items) = v else {
        return Err(format!("tensor {what} is not a tuple"));
    };
    items
        .iter()
        .map(|i| match i {
            Value::Int(x) if *x >= 0 => Ok(*x as usize),
            _ => Err(format!("tensor {what} holds a non-integer")),
        })
        .collect()
}

fn reduce(func: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &func else {
        return Ok(Value::Object(describe(&func)));
    };
    let Value::Tuple(args) = args else {
        return Ok(Value::Object(describe(&func)));
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let [
                Value::Storage(dtype, key),
                Value::Int(offset),
                size,
                stride,
                ..,
            ] = args.as_slice()
            else {
                return Err("malformed _rebuild_tensor_v2 arguments".into());
            };
            let shape = as_usizes(size, "size")?;
            let stride = as_usizes(stride, "stride")?;
            if shape.len() != stride.len() || *offset < 0 {
                return Err("tensor size and stride disagree".into());
            }
            Ok(Value::Tensor(TensorRef {
                storage_key: key.clone(),
                dtype: *dtype,
                offset: *offset as usize,
                shape,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => args
            .into_iter()
            .next()
            .ok_or_else(|| "empty _rebuild_parameter".to_string()),
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        _ => Ok(Value::Object(describe(&func))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scalars_containers_and_memo() {
        // pickle.dumps({'a': [1, -2, 70000], 'b': (1.5, True, None), 'c': 'é'}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffJp\x11\x01\x00eX\x01\x00\x00\x00bq\x03G?\xf8\x00\x00\x00\x00\x00\x00\x88N\x87q\x04X\x01\x00\x00\x00cq\x05X\x02\x00\x00\x00\xc3\xa9q\x06u.";
        let v = parse(bytes).unwrap();
        let Value::Dict(entries) = v else { panic!() };
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].1,
            Value::List(vec![Value::Int(1), Value::Int(-2), Value::Int(70000)])
        );
        assert_eq!(
            entries[1].1,
            Value::Tuple(vec![Value::Float(1.5), Value::Bool(true), Value::None])
        );
        assert_eq!(entries[2].1, Value::Str("é".into()));
    }

    #[test]
    fn long1_is_sign_extended() {
        // pickle.dumps(-300, protocol=2) → LONG1 with 2 bytes
        let v = parse(b"\x80\x02\x8a\x02\xd4\xfe.").unwrap();
        assert_eq!(v, Value::Int(-300));
    }

    #[test]
    fn truncated_and_corrupt_input_is_an_error_not_a_panic() {
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.";
        assert!(parse(bytes).is_ok());
        for cut in 0..bytes.len() - 1 {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(b"\x80\x02u.").is_err());
        assert!(parse(b"\x80\x02h\x05.").is_err());
        assert!(parse(b"\x80\x02X\xff\xff\xff\xff.").is_err());
        assert!(parse(b"\x80\x02\xff.").is_err());
    }

    /// "Billion laughs": each level a list of ten memo references to the
    /// level below. Copies are charged, so it stops at the budget.
    #[test]
    fn memo_bombs_are_refused_within_the_budget() {
        let mut bytes = b"\x80\x02]q\x00K\x01a".to_vec();
        for level in 1..=9u8 {
            // EMPTY_LIST, MARK, BINGET(level - 1) × 10, APPENDS, BINPUT(level)
            bytes.extend(b"](");
            for _ in 0..10 {
                bytes.extend([b'h', level - 1]);
            }
            bytes.extend([b'e', b'q', level]);
        }
        bytes.push(b'.');
        let err = parse(&bytes).unwrap_err();
        assert!(err.contains("values"), "{err}");
    }

    /// A million nested tuples: refused at the depth limit, and what was
    /// built is dropped without exhausting the stack.
    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = b"\x80\x02N".to_vec();
        bytes.extend(std::iter::repeat_n(0x85u8, 1_000_000)); // TUPLE1
        bytes.push(b'.');
        let err = parse(&bytes).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        // Nested lists through APPEND, and a shallow file just under the limit.
        let mut lists = b"\x80\x02".to_vec();
        lists.extend(std::iter::repeat_n(b']', 300_000));
        lists.extend(std::iter::repeat_n(b'a', 299_999));
        lists.push(b'.');
        assert!(parse(&lists).unwrap_err().contains("nested"));
        let mut ok = b"\x80\x02N".to_vec();
        ok.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize - 1));
        ok.push(b'.');
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn unknown_classes_become_opaque_objects() {
        // An instance of some.Config(), NEWOBJ then BUILD with state
        let bytes = b"\x80\x02csome\nConfig\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00xK\x01sb.";
        assert_eq!(parse(bytes).unwrap(), Value::Object("some.Config".into()));
    }
}
