module evalsvc/clients/go

go 1.19
