//! The protobuf wire primitives `PBMeta` needs: varints, field keys, skipping.
//! The input is always a whole (length-known) message, so running out of bytes is
//! an error, not `Incomplete`.

use nom::IResult;

use super::MetaError;

pub(crate) const WT_VARINT: u8 = 0;
pub(crate) const WT_FIXED64: u8 = 1;
pub(crate) const WT_LEN: u8 = 2;
pub(crate) const WT_FIXED32: u8 = 5;
const MAX_VARINT_LEN: usize = 10;

fn fail<T>(e: MetaError) -> IResult<&'static [u8], T, MetaError> {
    Err(nom::Err::Failure(e))
}

/// Parses a base-128 varint (at most 10 bytes; bits beyond 64 are dropped as
/// protobuf does).
pub(crate) fn parse_varint(input: &[u8]) -> IResult<&[u8], u64, MetaError> {
    let mut value = 0u64;
    for (i, &b) in input.iter().enumerate().take(MAX_VARINT_LEN) {
        value |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((&input[i + 1..], value));
        }
    }
    if input.len() >= MAX_VARINT_LEN {
        fail(MetaError::OverlongVarint)
    } else {
        fail(MetaError::TruncatedVarint)
    }
}

/// One field's value, borrowed from the message. Fixed-width values are only
/// ever skipped (meta.proto has none), so their bytes are not decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64,
    Len(&'a [u8]),
    Fixed32,
}

impl Value<'_> {
    pub(crate) fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => WT_VARINT,
            Value::Fixed64 => WT_FIXED64,
            Value::Len(_) => WT_LEN,
            Value::Fixed32 => WT_FIXED32,
        }
    }
}

/// A parsed field: its number, value, and its whole encoding (for unknown fields).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'a> {
    pub(crate) number: u32,
    pub(crate) value: Value<'a>,
    pub(crate) raw: &'a [u8],
}

pub(crate) fn parse_field(input: &[u8]) -> IResult<&[u8], Field<'_>, MetaError> {
    let start = input;
    let (input, key) = parse_varint(input)?;
    let number = key >> 3;
    if number == 0 || number > u64::from(u32::MAX >> 3) {
        return Err(nom::Err::Failure(MetaError::BadKey(key)));
    }
    let number = number as u32;
    let truncated = || nom::Err::Failure(MetaError::Truncated { field: number });
    let (rest, value) = match (key & 7) as u8 {
        WT_VARINT => {
            let (rest, v) = parse_varint(input)?;
            (rest, Value::Varint(v))
        }
        WT_FIXED64 => {
            input.get(..8).ok_or_else(truncated)?;
            (&input[8..], Value::Fixed64)
        }
        WT_LEN => {
            let (rest, len) = parse_varint(input)?;
            // Checked against what is there: nothing is allocated for the claim.
            let len = usize::try_from(len).map_err(|_| truncated())?;
            if len > rest.len() {
                return Err(truncated());
            }
            (&rest[len..], Value::Len(&rest[..len]))
        }
        WT_FIXED32 => {
            input.get(..4).ok_or_else(truncated)?;
            (&input[4..], Value::Fixed32)
        }
        _ => return Err(nom::Err::Failure(MetaError::BadKey(key))),
    };
    let raw = &start[..start.len() - rest.len()];
    Ok((rest, Field { number, value, raw }))
}

/// Calls `on_field` for every field of a whole message.
pub(crate) fn for_each_field<'a>(
    mut input: &'a [u8],
    mut on_field: impl FnMut(Field<'a>) -> Result<(), MetaError>,
) -> Result<(), MetaError> {
    while !input.is_empty() {
        let (rest, field) = parse_field(input).map_err(|e| match e {
            nom::Err::Error(e) | nom::Err::Failure(e) => e,
            nom::Err::Incomplete(_) => MetaError::TruncatedVarint,
        })?;
        on_field(field)?;
        input = rest;
    }
    Ok(())
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_key(out: &mut Vec<u8>, number: u32, wire_type: u8) {
    put_varint(out, (u64::from(number) << 3) | u64::from(wire_type));
}

/// An int32 as protobuf writes it: negatives sign-extend to 10 bytes.
pub(crate) fn put_int32(out: &mut Vec<u8>, number: u32, v: i32) {
    put_key(out, number, WT_VARINT);
    put_varint(out, i64::from(v) as u64);
}

pub(crate) fn put_bool(out: &mut Vec<u8>, number: u32, v: bool) {
    put_key(out, number, WT_VARINT);
    out.push(u8::from(v));
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, number: u32, v: &[u8]) {
    put_key(out, number, WT_LEN);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        assert_eq!(parse_varint(&[0x00]).unwrap().1, 0);
        assert_eq!(
            parse_varint(&[0xff, 0xff, 0xff, 0xff, 0x07]).unwrap().1,
            i32::MAX as u64
        );
        let mut neg = Vec::new();
        put_varint(&mut neg, i64::from(-2_088_777_088i32) as u64);
        assert_eq!(neg.len(), 10);
        assert_eq!(parse_varint(&neg).unwrap().1 as i32, -2_088_777_088);
        assert_eq!(
            parse_varint(&[0x80, 0x80]),
            Err(nom::Err::Failure(MetaError::TruncatedVarint))
        );
        assert_eq!(
            parse_varint(&[0x80; 11]),
            Err(nom::Err::Failure(MetaError::OverlongVarint))
        );
    }
}
