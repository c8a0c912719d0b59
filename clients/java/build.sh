#!/usr/bin/env bash
# Builds the Java example against stubs generated from ../../proto, with the gRPC and
# protobuf jars Debian packages (no Maven repository needed), and optionally runs it.
#
#   clients/java/build.sh              # generate + compile into clients/java/build/
#   clients/java/build.sh run ARGS...  # then run ImportJob (see its javadoc)
#
# Needs (Debian 12): protobuf-compiler protobuf-compiler-grpc-java-plugin libgrpc-java
# libprotobuf-java libgeronimo-annotation-1.3-spec-java; to run also libnetty-java
# libperfmark-java libgoogle-gson-java. JAVA_JARS overrides /usr/share/java.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$here/build
jars=${JAVA_JARS:-/usr/share/java}
plugin=${GRPC_JAVA_PLUGIN:-$(command -v grpc_java_plugin || echo /usr/bin/grpc_java_plugin)}

cp_of() { local IFS=:; echo "$*"; }
compile_cp=$(cp_of "$jars"/grpc-api.jar "$jars"/grpc-stub.jar "$jars"/grpc-protobuf.jar \
    "$jars"/grpc-protobuf-lite.jar "$jars"/grpc-context.jar "$jars"/protobuf.jar "$jars"/guava.jar \
    "$jars"/geronimo-annotation-1.3-spec.jar "$jars"/error_prone_annotations.jar)
run_cp=$(cp_of "$compile_cp" "$jars"/grpc-core.jar "$jars"/grpc-netty.jar "$jars"/perfmark-api.jar \
    "$jars"/gson.jar "$jars"/netty-{common,buffer,transport,resolver,codec,codec-http,codec-http2,codec-socks,handler,handler-proxy}.jar)

rm -rf "$out" && mkdir -p "$out/gen" "$out/classes"
# google/rpc (status, error_details) are vendored in proto/ here because Debian has no
# proto-google-common-protos jar; with Maven, depend on that artifact instead.
protoc -I "$repo/proto" -I "$here/proto" \
    --plugin=protoc-gen-grpc-java="$plugin" \
    --java_out="$out/gen" --grpc-java_out="$out/gen" \
    jobtoken/v1/jobtoken.proto jobtoken/v1/admin.proto google/rpc/status.proto google/rpc/error_details.proto
javac -Xlint:all,-processing,-serial -Werror --release 17 -d "$out/classes" -cp "$compile_cp" \
    -Xlint:-deprecation -Xlint:-rawtypes -Xlint:-unchecked \
    $(find "$out/gen" "$here/src" -name '*.java')
echo "built: $out/classes"

if [[ ${1:-} == run ]]; then
    shift
    exec java -cp "$out/classes:$run_cp" org.folio.jobtoken.example.ImportJob "$@"
fi
