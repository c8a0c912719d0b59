//! Request decoding through the service's codec (`jobtoken_proto::codec`): the first byte
//! picks a request type and a mode; the rest is one framed message (a decode error must
//! be INVALID_ARGUMENT, never INTERNAL) or a raw request body (any framing; no panic).
//! What decodes re-encodes to the same message.
#![no_main]

use std::fmt::Debug;

use bytes::Bytes;
use http_body_util::Full;
use jobtoken_proto::codec::ValidatingCodec;
use jobtoken_proto::jobtoken::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, Streaming};

/// The server's receive limit is larger; this bounds memory per input.
const MAX_MESSAGE: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let framed = selector & 0x80 == 0;
    match selector & 0x7f {
        0 => decode::<pb::IssueJobTokenRequest>(framed, body),
        1 => decode::<pb::RefreshJobTokenRequest>(framed, body),
        2 => decode::<pb::ResumeJobTokenRequest>(framed, body),
        3 => decode::<pb::RevokeJobTokenRequest>(framed, body),
        4 => decode::<pb::IntrospectTokenRequest>(framed, body),
        5 => decode::<pb::GetJwksRequest>(framed, body),
        6 => decode::<pb::WatchRevocationsRequest>(framed, body),
        7 => decode::<pb::GetLeaseRequest>(framed, body),
        8 => decode::<pb::ListLeasesRequest>(framed, body),
        9 => decode::<pb::RevokeLeaseRequest>(framed, body),
        10 => decode::<pb::RevokeJobRequest>(framed, body),
        11 => decode::<pb::RevokeSubjectRequest>(framed, body),
        12 => decode::<pb::RevokeActorRequest>(framed, body),
        13 => decode::<pb::RotateSigningKeyRequest>(framed, body),
        _ => {}
    }
});

fn decode<M: Message + Default + PartialEq + Debug + Send + 'static>(framed: bool, body: &[u8]) {
    if framed && body.len() > MAX_MESSAGE {
        return; // OUT_OF_RANGE by design, not a decode error
    }
    let wire = if framed {
        // One uncompressed gRPC frame: flag 0, big-endian length, the message.
        let mut wire = Vec::with_capacity(body.len() + 5);
        wire.push(0);
        wire.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        wire.extend_from_slice(body);
        wire
    } else {
        body.to_vec()
    };
    let decoder = ValidatingCodec::<(), M>::default().decoder();
    let mut stream = Streaming::new_request(
        decoder,
        Full::new(Bytes::from(wire)),
        None,
        Some(MAX_MESSAGE),
    );
    loop {
        match futures::executor::block_on(stream.message()) {
            Ok(Some(message)) => {
                let again = M::decode(message.encode_to_vec().as_slice()).expect("re-decodes");
                assert_eq!(again, message);
            }
            Ok(None) => return,
            Err(status) => {
                // Framing errors are INTERNAL by the gRPC spec; a message that does not
                // decode is the caller's mistake.
                if framed {
                    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                }
                return;
            }
        }
    }
}
