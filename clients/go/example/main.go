// Command example creates a run over three recorded answers and watches it to the end, printing progress; a
// dropped stream is resumed from the last seq it saw. The same example as the Python and TypeScript ones.
//
//	EVALSVC_API_KEY=evk_... go run ./example 127.0.0.1:50051   (see clients/README.md for the offline build)
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	evalsvcv1 "evalsvc/clients/go/gen/evalsvc/v1"
)

func requestID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func progress(c *evalsvcv1.RunCounts) string {
	return fmt.Sprintf("(%d/%d)", c.GetCompletedEvaluations(), c.GetTotalEvaluations())
}

func statusName(s evalsvcv1.RunStatus) string {
	name := s.String()
	const prefix = "RUN_STATUS_"
	if len(name) > len(prefix) && name[:len(prefix)] == prefix {
		return name[len(prefix):]
	}
	return name
}

// describe is an error's one-line text with the server's rich details (docs/errors.md): the ErrorInfo reason and
// each BadRequest field violation. The detail types come from genproto's googleapis/rpc/errdetails, the package
// grpc's own status package builds on (clients/go/gen has no google/rpc: a second copy would panic at init).
func describe(err error) string {
	st := status.Convert(err)
	text := fmt.Sprintf("%s: %s", st.Code(), st.Message())
	var violations []string
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			text += fmt.Sprintf(" (%s)", d.GetReason())
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, fmt.Sprintf("%s: %s", v.GetField(), v.GetDescription()))
			}
		}
	}
	if len(violations) > 0 {
		text += " - " + strings.Join(violations, "; ")
	}
	return text
}

func main() {
	target := "127.0.0.1:50051"
	if len(os.Args) > 1 {
		target = os.Args[1]
	} else if env := os.Getenv("EVALCTL_TARGET"); env != "" {
		target = env
	}
	apiKey := os.Getenv("EVALSVC_API_KEY")
	if apiKey == "" {
		// Without it every call fails Unauthenticated; say how to get one instead (as the TypeScript example does).
		fmt.Fprintln(os.Stderr, "example: set EVALSVC_API_KEY to an API key (`evalsvc keys create --tenant default --db <the server's --db>` makes one in its database)")
		os.Exit(2)
	}
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		log.Fatalf("dial %s: %v", target, err)
	}
	defer conn.Close()
	client := evalsvcv1.NewEvalRunServiceClient(conn)
	// Every call carries `authorization: Bearer <key>`.
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+apiKey)

	answers := [][3]string{{"What is 2+2?", "4", "4"}, {"Capital of France?", "Paris", "Paris"}, {"Largest planet?", "Jupiter", "Saturn"}}
	request := &evalsvcv1.CreateRunRequest{
		RequestId:   requestID(), // retries with the same request_id return the same run
		DisplayName: "example",
		Target:      &evalsvcv1.Target{Kind: &evalsvcv1.Target_Provided{Provided: &evalsvcv1.ProvidedTarget{}}},
		Graders:     []*evalsvcv1.Grader{{Name: "exact", Kind: &evalsvcv1.Grader_ExactMatch{ExactMatch: &evalsvcv1.ExactMatch{}}}},
	}
	for i, a := range answers {
		request.Items = append(request.Items, &evalsvcv1.Item{
			Id: fmt.Sprintf("item-%d", i+1), Input: a[0], ExpectedOutput: a[1], Response: &evalsvcv1.Response{Content: a[2]},
		})
	}
	createCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	created, err := client.CreateRun(createCtx, request)
	cancel()
	if err != nil {
		log.Fatalf("CreateRun: %s", describe(err))
	}
	run := created.GetRun()
	fmt.Printf("created %s with %d jobs\n", run.GetId(), created.GetJobCount())

	var lastSeq int64
	final := run
	for failures := 0; ; {
		stream, err := client.WatchRun(ctx, &evalsvcv1.WatchRunRequest{RunId: run.GetId(), AfterSeq: lastSeq})
		for err == nil {
			var event *evalsvcv1.WatchRunResponse
			event, err = stream.Recv()
			if err != nil {
				break
			}
			failures = 0
			if event.GetHeartbeat() != nil || event.GetSeq() <= lastSeq {
				continue
			}
			lastSeq = event.GetSeq()
			if r := event.GetRun(); r != nil {
				final = r
				fmt.Printf("#%d run %s %s\n", event.GetSeq(), statusName(r.GetStatus()), progress(event.GetCounts()))
			} else if r := event.GetResult(); r != nil {
				verdict := "FAILED"
				if r.GetPassed() {
					verdict = "PASSED"
				}
				fmt.Printf("#%d %s %s: %s %s\n", event.GetSeq(), r.GetItemId(), r.GetGrader(), verdict, progress(event.GetCounts()))
			}
		}
		if errors.Is(err, io.EOF) {
			break // the stream ends OK after the terminal event
		}
		code := status.Code(err)
		failures++
		if (code != codes.Unavailable && code != codes.DeadlineExceeded && code != codes.ResourceExhausted) || failures > 30 {
			log.Fatalf("WatchRun: %s", describe(err))
		}
		backoff := time.Duration(50<<uint(failures)) * time.Millisecond
		if backoff > 2*time.Second {
			backoff = 2 * time.Second
		}
		time.Sleep(backoff)
	}
	switch final.GetStatus() {
	case evalsvcv1.RunStatus_RUN_STATUS_SUCCEEDED, evalsvcv1.RunStatus_RUN_STATUS_FAILED, evalsvcv1.RunStatus_RUN_STATUS_CANCELLED:
	default:
		log.Fatalf("watch ended before the run did: %s", statusName(final.GetStatus()))
	}
	fmt.Printf("pass rate %.0f%%, overall passed: %t\n", final.GetAggregate().GetPassRate()*100, final.GetOverallPassed())
}
