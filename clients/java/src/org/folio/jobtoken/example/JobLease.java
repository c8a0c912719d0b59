package org.folio.jobtoken.example;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import io.grpc.Channel;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import org.folio.jobtoken.v1.IssueJobTokenRequest;
import org.folio.jobtoken.v1.IssueJobTokenResponse;
import org.folio.jobtoken.v1.JobOutcome;
import org.folio.jobtoken.v1.JobTokenServiceGrpc;
import org.folio.jobtoken.v1.Lease;
import org.folio.jobtoken.v1.RefreshJobTokenRequest;
import org.folio.jobtoken.v1.RefreshJobTokenResponse;
import org.folio.jobtoken.v1.RevokeJobTokenRequest;
import org.folio.jobtoken.v1.TokenPair;

/**
 * One job lease, held the way docs/clients.md says: renewed on a background thread at ~70% of
 * each token's life (from the durations the service returns, never from clocks), transient
 * failures retried with the same refresh token (politely while the token is healthy, about
 * every second near and after expiry), terminal answers ending the lease with their reason.
 *
 * <p>An example, not a library: it leaves out the revocation stream and resume (see the guide,
 * sections 3 and 6, and clients/python for a complete client).
 */
public final class JobLease implements AutoCloseable {
  // docs/clients.md, "The numbers".
  static final double REFRESH_AT = 0.7;
  static final double JITTER = 0.1;
  static final long MIN_DELAY_MS = 500;
  static final long BACKOFF_INITIAL_MS = 1_000;
  static final long BACKOFF_MAX_MS = 10_000;
  static final long NEAR_EXPIRY_MS = 10_000;
  static final long URGENT_RETRY_MS = 1_000;
  static final long RPC_TIMEOUT_MS = 10_000;
  static final long FLOOR_MS = 50;

  /** The metadata entry that carries a module key. */
  public static final Metadata.Key<String> MODULE_KEY =
      Metadata.Key.of("x-module-key", Metadata.ASCII_STRING_MARSHALLER);

  /** How the lease ended: the machine reason (e.g. LEASE_REVOKED) and the service's message. */
  public record End(String reason, String detail) {}

  private final Channel channel;
  private final JobTokenServiceGrpc.JobTokenServiceBlockingStub stub;
  private final ScheduledExecutorService renewer;
  private final CompletableFuture<End> ended = new CompletableFuture<>();
  private final Lease lease;
  // Written only by the renewer thread; read by any.
  private volatile String accessToken;
  private volatile long expiresAtNanos;
  private volatile int renewals;
  private String refreshToken;
  private int attempt;

  private JobLease(
      Channel channel, JobTokenServiceGrpc.JobTokenServiceBlockingStub stub, IssueJobTokenResponse granted) {
    this.channel = channel;
    this.stub = stub;
    this.lease = granted.getLease();
    this.renewer =
        Executors.newSingleThreadScheduledExecutor(
            r -> {
              Thread t = new Thread(r, "jobtoken-renew-" + granted.getLease().getJobId());
              t.setDaemon(true);
              return t;
            });
    long life = publish(granted.getTokens());
    schedule(refreshInMs(life, ThreadLocalRandom.current().nextDouble()));
  }

  /**
   * Grants a lease for {@code jobId} from the user's access token and starts renewing it.
   *
   * @throws StatusRuntimeException if refused; {@link #reason} names why
   */
  public static JobLease grant(
      Channel channel, String moduleKey, String jobId, String subjectToken, List<String> permissions) {
    Metadata md = new Metadata();
    md.put(MODULE_KEY, moduleKey);
    var stub =
        JobTokenServiceGrpc.newBlockingStub(channel)
            .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md));
    var granted =
        stub.withDeadlineAfter(RPC_TIMEOUT_MS, TimeUnit.MILLISECONDS)
            .issueJobToken(
                IssueJobTokenRequest.newBuilder()
                    .setSubjectToken(subjectToken)
                    .setJobId(jobId)
                    .addAllPermissions(permissions)
                    .build());
    return new JobLease(channel, stub, granted);
  }

  /** What the service granted. */
  public Lease lease() {
    return lease;
  }

  /** The current access token, for {@code authorization: Bearer ...}. */
  public String accessToken() {
    if (ended.isDone()) {
      throw new IllegalStateException("the lease has ended: " + ended.join());
    }
    return accessToken;
  }

  /** Completes when the lease ends: the job should checkpoint and stop. */
  public CompletableFuture<End> ended() {
    return ended;
  }

  /** Successful renewals so far. */
  public int renewals() {
    return renewals;
  }

  /** Ends the lease with the job's outcome and stops renewing. */
  public void release(JobOutcome outcome, String detail) {
    renewer.shutdownNow();
    stub.withDeadlineAfter(RPC_TIMEOUT_MS, TimeUnit.MILLISECONDS)
        .revokeJobToken(
            RevokeJobTokenRequest.newBuilder()
                .setLeaseId(lease.getLeaseId())
                .setOutcome(outcome)
                .setDetail(detail)
                .build());
    ended.complete(new End("LEASE_RELEASED", "released: " + outcome));
  }

  @Override
  public void close() {
    if (!ended.isDone()) {
      release(JobOutcome.JOB_OUTCOME_CANCELLED, "closed");
    }
  }

  /** The refresh token in hand (for the example's final check only: a secret, never log it). */
  String refreshTokenForExample() {
    return refreshToken;
  }

  // --- the renewal loop -------------------------------------------------------------------

  private long publish(TokenPair pair) {
    long lifeMs =
        Math.max(
            0,
            pair.getAccessTokenExpiresIn().getSeconds() * 1000
                + pair.getAccessTokenExpiresIn().getNanos() / 1_000_000);
    refreshToken = pair.getRefreshToken();
    accessToken = pair.getAccessToken();
    expiresAtNanos = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(lifeMs);
    return lifeMs;
  }

  private void schedule(long delayMs) {
    if (!renewer.isShutdown()) {
      renewer.schedule(this::renew, delayMs, TimeUnit.MILLISECONDS);
    }
  }

  private void renew() {
    long untilExpiryMs = TimeUnit.NANOSECONDS.toMillis(expiresAtNanos - System.nanoTime());
    long timeoutMs = Math.min(Math.max(untilExpiryMs / 2, 1_000), RPC_TIMEOUT_MS);
    RefreshJobTokenResponse renewed;
    try {
      renewed =
          stub.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
              .refreshJobToken(
                  RefreshJobTokenRequest.newBuilder()
                      .setLeaseId(lease.getLeaseId())
                      .setRefreshToken(refreshToken)
                      .build());
    } catch (StatusRuntimeException e) {
      if (!isTransient(e.getStatus().getCode())) {
        ended.complete(new End(reason(e).orElse(e.getStatus().getCode().name()), e.getStatus().getDescription()));
        renewer.shutdown();
        return;
      }
      // Same refresh token next time: the grace window makes a retry converge.
      long wait = retryInMs(attempt++, untilExpiryMs, ThreadLocalRandom.current().nextDouble());
      wait = Math.max(wait, retryDelayMs(e).orElse(0L));
      if (untilExpiryMs <= NEAR_EXPIRY_MS && channel instanceof ManagedChannel managed) {
        // gRPC's reconnect backoff grows to minutes; near expiry, try the service now.
        managed.resetConnectBackoff();
      }
      schedule(wait);
      return;
    }
    attempt = 0;
    renewals++;
    long life = publish(renewed.getTokens());
    schedule(refreshInMs(life, ThreadLocalRandom.current().nextDouble()));
  }

  /** When to renew a token that lives {@code lifeMs}; {@code u} uniform in [0, 1). */
  static long refreshInMs(long lifeMs, double u) {
    double wanted = lifeMs * (REFRESH_AT + JITTER * (2 * u - 1));
    double earliest = Math.min(MIN_DELAY_MS, lifeMs / 2.0);
    double latest = lifeMs - Math.max(lifeMs * 0.05, 10);
    return Math.max((long) Math.max(Math.min(wanted, latest), earliest), FLOOR_MS);
  }

  /** How long to wait before retry {@code attempt} (0-based) after a transient failure. */
  static long retryInMs(int attempt, long untilExpiryMs, double u) {
    if (untilExpiryMs <= NEAR_EXPIRY_MS) {
      return Math.max((long) (URGENT_RETRY_MS * (0.5 + u)), FLOOR_MS);
    }
    double polite = Math.min(BACKOFF_INITIAL_MS * Math.pow(2, Math.min(attempt, 20)), BACKOFF_MAX_MS);
    polite = Math.min(polite * (0.5 + 0.5 * u), untilExpiryMs - NEAR_EXPIRY_MS);
    return Math.max((long) polite, Math.max(URGENT_RETRY_MS / 2, FLOOR_MS));
  }

  // --- errors (docs/clients.md, section 5) ------------------------------------------------

  /** Codes a retry can change; every other code is an answer. */
  static boolean isTransient(Status.Code code) {
    return switch (code) {
      case UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, UNKNOWN, INTERNAL, CANCELLED ->
          true;
      default -> false;
    };
  }

  /** The stable reason of a failed call ({@code google.rpc.ErrorInfo.reason}). */
  public static Optional<String> reason(Throwable e) {
    return detail(e, ErrorInfo.class).map(ErrorInfo::getReason);
  }

  /** {@code google.rpc.RetryInfo.retry_delay} of a RATE_LIMITED answer, in milliseconds. */
  static Optional<Long> retryDelayMs(Throwable e) {
    return detail(e, RetryInfo.class)
        .map(r -> r.getRetryDelay().getSeconds() * 1000 + r.getRetryDelay().getNanos() / 1_000_000);
  }

  private static <T extends com.google.protobuf.Message> Optional<T> detail(Throwable e, Class<T> type) {
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (status == null) {
      return Optional.empty();
    }
    for (Any any : status.getDetailsList()) {
      if (any.is(type)) {
        try {
          return Optional.of(any.unpack(type));
        } catch (InvalidProtocolBufferException bad) {
          return Optional.empty();
        }
      }
    }
    return Optional.empty();
  }
}
