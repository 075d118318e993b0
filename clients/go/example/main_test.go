package main

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	evalsvcv1 "evalsvc/clients/go/gen/evalsvc/v1"
)

// TestDescribeDecodesBadRequest sends CreateRun an invalid regex and reads the reason and the field violation
// from the error's details, with grpc and genproto's errdetails in one program. It needs a live server:
// EVALSVC_TEST_TARGET and EVALSVC_API_KEY (tests/test_client_go.py sets both).
func TestDescribeDecodesBadRequest(t *testing.T) {
	target := os.Getenv("EVALSVC_TEST_TARGET")
	if target == "" {
		t.Skip("EVALSVC_TEST_TARGET is not set")
	}
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+os.Getenv("EVALSVC_API_KEY"))
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = evalsvcv1.NewEvalRunServiceClient(conn).CreateRun(ctx, &evalsvcv1.CreateRunRequest{
		RequestId: requestID(),
		Target:    &evalsvcv1.Target{Kind: &evalsvcv1.Target_Provided{Provided: &evalsvcv1.ProvidedTarget{}}},
		Graders:   []*evalsvcv1.Grader{{Name: "r", Kind: &evalsvcv1.Grader_Regex{Regex: &evalsvcv1.Regex{Pattern: "a("}}}},
		Items:     []*evalsvcv1.Item{{Id: "i1", Input: "x", Response: &evalsvcv1.Response{Content: "x"}}},
	})
	if err == nil {
		t.Fatal("CreateRun accepted an invalid regex")
	}
	got := describe(err)
	for _, want := range []string{"InvalidArgument: ", "(INVALID_ARGUMENT)", " - graders[0].regex.pattern: invalid regular expression"} {
		if !strings.Contains(got, want) {
			t.Errorf("describe(err) = %q, want it to contain %q", got, want)
		}
	}
}
