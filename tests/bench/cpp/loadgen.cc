// A gRPC load generator over mTLS: C channels (each its own connection), N unary calls kept in
// flight on one completion queue, pre-serialised request bytes through the generic stub (no
// generated code).
//
// Usage: loadgen TARGET CA CERT KEY METHOD PAYLOAD_HEX INFLIGHT CHANNELS
// Protocol (shared with the Python and Node generators, see tests/bench/gen.py): warms up,
// prints "ready", reads "T0 T1" (CLOCK_MONOTONIC nanoseconds) from stdin, counts the calls
// that complete inside [T0, T1], stops issuing at T1, drains and prints one JSON line.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

int64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

std::string read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (static_cast<unsigned char>(c) >= 0x20) {
      out.push_back(c);
    }
  }
  return out;
}

struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc;
  int64_t start = 0;
  int slot = 0;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: loadgen TARGET CA CERT KEY METHOD PAYLOAD_HEX INFLIGHT CHANNELS\n";
    return 2;
  }
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = read_file(argv[2]);
  tls.pem_cert_chain = read_file(argv[3]);
  tls.pem_private_key = read_file(argv[4]);
  const std::string method = argv[5];
  // "@PATH": the raw request bytes in a file (a batch request is too long for argv).
  const std::string payload = argv[6][0] == '@' ? read_file(argv[6] + 1) : from_hex(argv[6]);
  const int inflight = std::stoi(argv[7]);
  const int channels = std::max(1, std::stoi(argv[8]));

  // A local subchannel pool per channel: otherwise channels to one target share a connection,
  // and SO_REUSEPORT spreads connections, not calls, over a server's processes.
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    stubs.emplace_back(std::make_unique<grpc::GenericStub>(
        grpc::CreateCustomChannel(argv[1], grpc::SslCredentials(tls), args)));
  }
  grpc::CompletionQueue cq;
  grpc::Slice slice(payload);
  const grpc::ByteBuffer request(&slice, 1);

  std::atomic<int64_t> t0{INT64_MAX};
  std::atomic<int64_t> t1{INT64_MAX};
  std::thread reader([&] {
    int64_t a = 0;
    int64_t b = 0;
    if (std::cin >> a >> b) {
      t1.store(b);
      t0.store(a);
    }
  });

  auto start_call = [&](int slot) {
    grpc::GenericStub& stub = *stubs[slot % channels];
    auto* call = new Call;
    call->slot = slot;
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    call->start = now_ns();
    call->rpc = stub.PrepareUnaryCall(&call->ctx, method, request, &cq);
    call->rpc->StartCall();
    call->rpc->Finish(&call->response, &call->status, call);
  };

  for (int i = 0; i < inflight; ++i) start_call(i);
  int active = inflight;
  int64_t warm = 0;
  int64_t ok = 0;
  int64_t errors = 0;
  bool ready = false;
  std::string first_error;
  std::vector<int64_t> lat_us;
  lat_us.reserve(1 << 20);
  const int64_t warm_needed = std::max<int64_t>(20, 2 * inflight);

  void* tag = nullptr;
  bool got = false;
  while (active > 0 && cq.Next(&tag, &got)) {
    auto* call = static_cast<Call*>(tag);
    const int64_t end = now_ns();
    const int64_t w0 = t0.load();
    const int64_t w1 = t1.load();
    if (end >= w0 && end <= w1) {
      if (call->status.ok()) {
        ++ok;
        lat_us.push_back((end - call->start) / 1000);
      } else {
        ++errors;
        if (first_error.empty()) first_error = call->status.error_message();
      }
    } else if (!ready) {
      if (!call->status.ok() && first_error.empty()) first_error = call->status.error_message();
      if (++warm >= warm_needed) {
        ready = true;
        std::cout << "ready" << std::endl;
      }
    }
    const int slot = call->slot;
    delete call;
    if (end < w1) {
      start_call(slot);
    } else {
      --active;
    }
  }
  reader.join();
  std::cout << "{\"ok\":" << ok << ",\"errors\":" << errors << ",\"error\":\""
            << json_escape(first_error) << "\",\"lat_us\":[";
  for (size_t i = 0; i < lat_us.size(); ++i) {
    if (i) std::cout << ',';
    std::cout << lat_us[i];
  }
  std::cout << "]}" << std::endl;
  return 0;
}
