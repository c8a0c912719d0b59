//! The protobuf codec of every generated client and server: prost's, except that a
//! message that does not decode (bad UTF-8 in a string, truncated bytes) is
//! `INVALID_ARGUMENT` with reason `INVALID_ARGUMENT`, not gRPC's default `INTERNAL`: the
//! caller sent bad input, and should be told so.

use std::collections::HashMap;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tonic_types::{ErrorDetails, StatusExt};

/// [`ProstCodec`] with decode errors reported as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct ValidatingCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ValidatingDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder(self.0.decoder())
    }
}

/// Wraps a decoder, turning its `INTERNAL` parse errors into `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct ValidatingDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for ValidatingDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src).map_err(|status| {
            if status.code() != Code::Internal {
                return status;
            }
            Status::with_error_details(
                Code::InvalidArgument,
                format!("the message is not valid protobuf: {}", status.message()),
                ErrorDetails::with_error_info(
                    crate::wire::reason::INVALID_ARGUMENT,
                    crate::wire::ERROR_DOMAIN,
                    HashMap::new(),
                ),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
