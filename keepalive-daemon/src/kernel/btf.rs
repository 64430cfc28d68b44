//! Field offsets of kernel structs, read from the kernel's own BTF (/sys/kernel/btf/vmlinux).
//! Rust BPF programs get no CO-RE relocations, so the daemon finds the offsets it needs and
//! hands them to the program as a read-only global.
use std::{collections::HashMap, path::Path};

use keepalive_common::{
    KernelOffsets, OFFSETS_ADDRS, OFFSETS_CGROUP, OFFSETS_KEEPALIVE, OFFSETS_KILLS,
};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("no field {field} in struct {strukt}")]
    NoField { strukt: String, field: String },
    #[error("malformed BTF: unknown kind {kind} (type {id}): its size is unknown, so what follows cannot be read")]
    UnknownKind { kind: u32, id: usize },
}

struct Member {
    name: u32,
    type_id: u32,
    /// In bits.
    offset: u32,
}

enum Type {
    Composite {
        name: u32,
        members: Vec<Member>,
    },
    /// typedef, const, volatile and the like: only the referenced type matters.
    Alias(u32),
    Other,
}

pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id (0 is void).
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data =
            std::fs::read(path).map_err(|e| BtfError::Read(path.display().to_string(), e))?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(BTF_MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let field = |o| {
            u32_at(o)
                .map(|v| v as usize)
                .ok_or(BtfError::Malformed("short header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let section = |off: usize, len: usize, what| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Malformed(what))?;
            let end = start.checked_add(len).ok_or(BtfError::Malformed(what))?;
            data.get(start..end)
                .map(|_| (start, end))
                .ok_or(BtfError::Malformed(what))
        };
        let (str_start, str_end) = section(str_off, str_len, "string section out of bounds")?;
        let strings = data[str_start..str_end].to_vec();
        let (mut pos, end) = section(type_off, type_len, "type section out of bounds")?;
        let mut types = vec![Type::Other];
        while pos < end {
            let word =
                |o: usize| u32_at(pos + o).ok_or(BtfError::Malformed("type section truncated"));
            let (name, info, size_or_type) = (word(0)?, word(4)?, word(8)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            // What follows the common 12 bytes, per kind (include/uapi/linux/btf.h).
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => vlen * 12,
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => 0,
                _ => {
                    return Err(BtfError::UnknownKind {
                        kind,
                        id: types.len(),
                    })
                }
            };
            if pos + extra > end {
                return Err(BtfError::Malformed("type section truncated"));
            }
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let raw = |o| u32_at(m + o).ok_or(BtfError::Malformed("member truncated"));
                        let offset = raw(8)?;
                        members.push(Member {
                            name: raw(0)?,
                            type_id: raw(4)?,
                            offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    Type::Composite { name, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                _ => Type::Other,
            };
            types.push(ty);
            pos += extra;
        }
        let mut btf = Btf {
            strings,
            types,
            structs_by_name: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name, .. } = ty {
                let name = btf.string(*name).to_string();
                if !name.is_empty() {
                    btf.structs_by_name.entry(name).or_insert(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let start = offset as usize;
        let bytes = self.strings.get(start..).unwrap_or_default();
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias(next)) => id = *next,
                _ => break,
            }
        }
        id
    }

    /// The byte offset of `field` in struct `strukt`, looking through anonymous members.
    pub fn field_offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField {
            strukt: strukt.to_string(),
            field: field.to_string(),
        };
        let id = *self.structs_by_name.get(strukt).ok_or_else(no_field)?;
        self.find(id, field, 0)
            .map(|bits| bits / 8)
            .ok_or_else(no_field)
    }

    fn find(&self, id: u32, field: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let Some(Type::Composite { members, .. }) = self.types.get(self.resolve(id) as usize)
        else {
            return None;
        };
        for member in members {
            let name = self.string(member.name);
            if name == field {
                return Some(member.offset);
            }
            if name.is_empty() {
                if let Some(inner) = self.find(member.type_id, field, depth + 1) {
                    return Some(member.offset + inner);
                }
            }
        }
        None
    }
}

/// The offsets the programs need: to recognise a keepalive kill, and to find a socket's or a
/// new cgroup's id. A group whose fields this kernel lacks is left invalid, with the reason.
pub fn kernel_offsets() -> Result<(KernelOffsets, Vec<String>), BtfError> {
    let btf = Btf::from_sys_fs()?;
    let mut offsets = KernelOffsets::default();
    let mut missing = Vec::new();
    // tcp_sock starts with inet_connection_sock, which starts with inet_sock, then sock.
    let kills = (|| -> Result<(u32, u32, u32), BtfError> {
        Ok((
            btf.field_offset("sock", "sk_err")?,
            btf.field_offset("inet_connection_sock", "icsk_probes_out")?,
            btf.field_offset("inet_connection_sock", "icsk_retransmits")?,
        ))
    })();
    match kills {
        Ok((sk_err, probes_out, retransmits)) => {
            offsets.sk_err = sk_err;
            offsets.probes_out = probes_out;
            offsets.retransmits = retransmits;
            offsets.valid |= OFFSETS_KILLS;
        }
        Err(e) => missing.push(format!("keepalive kills: {e}")),
    }
    let cgroup = (|| -> Result<(u32, u32, u32, u32, u32, u32), BtfError> {
        Ok((
            btf.field_offset("sock", "sk_cgrp_data")?
                + btf.field_offset("sock_cgroup_data", "cgroup")?,
            btf.field_offset("cgroup", "kn")?,
            btf.field_offset("kernfs_node", "id")?,
            btf.field_offset("cgroup", "root")?,
            btf.field_offset("cgroup_root", "hierarchy_id")?,
            // Renamed in 6.15.
            btf.field_offset("kernfs_node", "__parent")
                .or_else(|_| btf.field_offset("kernfs_node", "parent"))?,
        ))
    })();
    match cgroup {
        Ok((sk_cgroup, cgroup_kn, kn_id, cgroup_root, hierarchy_id, kn_parent)) => {
            offsets.kn_parent = kn_parent;
            offsets.sk_cgroup = sk_cgroup;
            offsets.cgroup_kn = cgroup_kn;
            offsets.kn_id = kn_id;
            offsets.cgroup_root = cgroup_root;
            offsets.hierarchy_id = hierarchy_id;
            offsets.valid |= OFFSETS_CGROUP;
        }
        Err(e) => missing.push(format!("cgroup fields: {e}")),
    }
    let addrs = (|| -> Result<[u32; 7], BtfError> {
        let f = |field: &str| btf.field_offset("sock_common", field);
        Ok([
            f("skc_family")?,
            f("skc_daddr")?,
            f("skc_rcv_saddr")?,
            f("skc_dport")?,
            // Not `skc_num`: tcp_done_with_error() (6.10+) clears it before the error report.
            // inet_sock starts with struct sock, so this is an offset from the same pointer.
            btf.field_offset("inet_sock", "inet_sport")?,
            f("skc_v6_daddr")?,
            f("skc_v6_rcv_saddr")?,
        ])
    })();
    match addrs {
        Ok([family, daddr, saddr, dport, sport, daddr6, saddr6]) => {
            offsets.family = family;
            offsets.daddr = daddr;
            offsets.saddr = saddr;
            offsets.dport = dport;
            offsets.sport = sport;
            offsets.daddr6 = daddr6;
            offsets.saddr6 = saddr6;
            offsets.valid |= OFFSETS_ADDRS;
        }
        Err(e) => missing.push(format!("connection addresses in kill events: {e}")),
    }
    // tcp_sock starts with sock, so these are offsets from the same pointer.
    let keepalive = (|| -> Result<[u32; 6], BtfError> {
        Ok([
            btf.field_offset("tcp_sock", "keepalive_time")?,
            btf.field_offset("tcp_sock", "keepalive_intvl")?,
            btf.field_offset("tcp_sock", "keepalive_probes")?,
            // Moved into sock_common (which struct sock starts with) in 6.x.
            btf.field_offset("sock", "sk_flags")
                .or_else(|_| btf.field_offset("sock_common", "skc_flags"))?,
            btf.field_offset("inet_connection_sock", "icsk_user_timeout")?,
            btf.field_offset("sock_common", "skc_state")?,
        ])
    })();
    match keepalive {
        Ok([time, intvl, probes, flags, user_timeout, state]) => {
            offsets.state = state;
            offsets.keepalive_time = time;
            offsets.keepalive_intvl = intvl;
            offsets.keepalive_probes = probes;
            offsets.sk_flags = flags;
            offsets.user_timeout = user_timeout;
            offsets.valid |= OFFSETS_KEEPALIVE;
        }
        // Every socket then gets the options, whether it has them or not.
        Err(e) => missing.push(format!("sockets' own keepalive values: {e}")),
    }
    Ok((offsets, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_socket_fields_in_this_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            // Only a kernel built without CONFIG_DEBUG_INFO_BTF: kad then counts no kills.
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{} is missing",
                path.display()
            );
            eprintln!(
                "SKIPPED: {} is missing (kernel without BTF)",
                path.display()
            );
            return;
        }
        let (offsets, missing) = kernel_offsets().expect("this kernel has BTF");
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(
            offsets.valid,
            OFFSETS_KILLS | OFFSETS_CGROUP | OFFSETS_ADDRS | OFFSETS_KEEPALIVE
        );
        assert_eq!(
            offsets.saddr,
            offsets.daddr + 4,
            "skc_rcv_saddr follows skc_daddr"
        );
        assert!(offsets.kn_id > 0 && offsets.cgroup_kn > 0 && offsets.sk_cgroup > 0);
        // inet_connection_sock embeds struct sock first: its own fields come after sock's.
        let btf = Btf::from_sys_fs().unwrap();
        let icsk_inet = btf
            .field_offset("inet_connection_sock", "icsk_inet")
            .unwrap();
        assert_eq!(icsk_inet, 0);
        assert!(offsets.sk_err > 0);
        assert!(offsets.probes_out > offsets.sk_err);
        assert!(offsets.retransmits > offsets.sk_err);
        assert_ne!(offsets.probes_out, offsets.retransmits);
        assert!(btf.field_offset("sock", "no_such_field").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
    }

    /// A BTF blob: header, the types (each a list of u32 words), the strings.
    fn blob(types: &[Vec<u32>], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types
            .iter()
            .flatten()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut data = Vec::new();
        data.extend(BTF_MAGIC.to_le_bytes());
        data.extend([1u8, 0]); // version, flags
        for word in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            data.extend(word.to_le_bytes());
        }
        data.extend(type_bytes);
        data.extend(strings);
        data
    }

    fn info(kind: u32, vlen: u32) -> u32 {
        (kind << 24) | vlen
    }

    /// "\0int\0s\0a\0b\0": offsets 1 int, 5 s, 7 a, 9 b.
    const STRINGS: &[u8] = b"\0int\0s\0a\0b\0";

    fn int() -> Vec<u32> {
        vec![1, info(1, 0), 4, 32]
    }

    fn struct_s() -> Vec<u32> {
        // struct s { int a; int b; } with b at bit 32.
        vec![5, info(KIND_STRUCT, 2), 8, 7, 1, 0, 9, 1, 32]
    }

    #[test]
    fn reads_a_crafted_struct() {
        let btf = Btf::parse(&blob(&[int(), struct_s()], STRINGS)).unwrap();
        assert_eq!(btf.field_offset("s", "a").unwrap(), 0);
        assert_eq!(btf.field_offset("s", "b").unwrap(), 4);
        assert!(btf.field_offset("s", "c").is_err());
    }

    #[test]
    fn an_unknown_kind_is_an_error_not_a_misparse() {
        // Kind 31 does not exist: its size is unknown, and the struct after it cannot be found.
        let unknown = vec![0, info(31, 0), 0];
        let err = Btf::parse(&blob(&[int(), unknown, struct_s()], STRINGS))
            .err()
            .expect("refused");
        assert!(
            matches!(err, BtfError::UnknownKind { kind: 31, id: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("unknown kind 31"), "{err}");
        // Kind 0 (BTF_KIND_UNKN) is not a type either.
        let err = Btf::parse(&blob(&[vec![0, 0, 0]], STRINGS))
            .err()
            .expect("refused");
        assert!(
            matches!(err, BtfError::UnknownKind { kind: 0, id: 1 }),
            "{err}"
        );
    }

    #[test]
    fn truncated_and_out_of_bounds_sections_are_errors() {
        // A struct that claims more members than the section holds.
        let mut lying = struct_s();
        lying[1] = info(KIND_STRUCT, 5);
        assert!(Btf::parse(&blob(&[int(), lying], STRINGS)).is_err());
        // A string section past the end of the data, and one whose end overflows.
        let mut data = blob(&[int()], STRINGS);
        data[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Btf::parse(&data).is_err());
        data[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        data[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::parse(&data).is_err());
    }
}
