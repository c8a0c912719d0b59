package org.folio.jobtoken.example;

import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.folio.jobtoken.v1.JobOutcome;
import org.folio.jobtoken.v1.JobTokenServiceGrpc;
import org.folio.jobtoken.v1.RefreshJobTokenRequest;

/**
 * A job that holds a lease for a while, then releases it.
 *
 * <pre>
 * java ... org.folio.jobtoken.example.ImportJob HOST:PORT JOB_ID SECONDS
 * </pre>
 *
 * The module key comes from $JOBTOKEN_MODULE_KEY, the user's token from $SUBJECT_TOKEN. Exits 0
 * when the lease renewed at least once, every token was handed out while active, and a renewal
 * after the release is refused with reason LEASE_RELEASED.
 */
public final class ImportJob {
  public static void main(String[] args) throws Exception {
    String target = args[0];
    String jobId = args[1];
    long seconds = Long.parseLong(args[2]);
    String moduleKey = System.getenv("JOBTOKEN_MODULE_KEY");
    String subjectToken = System.getenv("SUBJECT_TOKEN");
    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    try {
      JobLease lease;
      try {
        lease = JobLease.grant(channel, moduleKey, jobId, subjectToken, List.of("inventory.write"));
      } catch (StatusRuntimeException refused) {
        System.err.println("refused: " + JobLease.reason(refused).orElse("?") + ": " + refused.getStatus());
        System.exit(2);
        return;
      }
      System.out.println("lease " + lease.lease().getLeaseId() + " granted: " + lease.lease().getGrantedPermissionsList());
      long start = System.nanoTime();
      long until = start + TimeUnit.SECONDS.toNanos(seconds);
      String last = lease.accessToken();
      while (System.nanoTime() < until && !lease.ended().isDone()) {
        String token = lease.accessToken(); // what each outgoing call would send
        if (!token.equals(last)) {
          System.out.printf(
              "renewed: token #%d at %.1f s%n", lease.renewals(), (System.nanoTime() - start) / 1e9);
          last = token;
        }
        Thread.sleep(100);
      }
      if (lease.ended().isDone()) {
        System.err.println("the lease ended early: " + lease.ended().join());
        System.exit(1);
      }
      String oldRefresh = lease.refreshTokenForExample();
      lease.release(JobOutcome.JOB_OUTCOME_SUCCEEDED, "example done");
      System.out.println("released after " + lease.renewals() + " renewals");

      // A renewal after the release is refused, with a reason a program can branch on.
      Metadata md = new Metadata();
      md.put(JobLease.MODULE_KEY, moduleKey);
      try {
        JobTokenServiceGrpc.newBlockingStub(channel)
            .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md))
            .withDeadlineAfter(5, TimeUnit.SECONDS)
            .refreshJobToken(
                RefreshJobTokenRequest.newBuilder()
                    .setLeaseId(lease.lease().getLeaseId())
                    .setRefreshToken(oldRefresh)
                    .build());
        System.err.println("a renewal after the release succeeded");
        System.exit(1);
      } catch (StatusRuntimeException e) {
        String reason = JobLease.reason(e).orElse("?");
        System.out.println("renewal after release: " + e.getStatus().getCode() + " " + reason);
        if (!reason.equals("LEASE_RELEASED") || lease.renewals() < 1) {
          System.exit(1);
        }
      }
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
