/*
 * READ CAPACITY(10) over iSCSI with libiscsi, printing "blocks <n> block_size <bytes>".
 * libiscsi's own tools do not print the block length, and READ CAPACITY(16) (iscsi-readcapacity16)
 * is not implemented for CD/DVD devices, so the tests build this to see what initiators see.
 *
 * usage: readcapacity10 <initiator-iqn> <iscsi-url>
 */
#include <stdio.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: %s <initiator-iqn> <iscsi-url>\n", argv[0]);
		return 2;
	}
	struct iscsi_context *iscsi = iscsi_create_context(argv[1]);
	struct iscsi_url *url = iscsi ? iscsi_parse_full_url(iscsi, argv[2]) : NULL;
	if (url == NULL) {
		fprintf(stderr, "bad URL: %s\n", iscsi ? iscsi_get_error(iscsi) : "no context");
		return 1;
	}
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "login failed: %s\n", iscsi_get_error(iscsi));
		return 1;
	}
	struct scsi_task *task = iscsi_readcapacity10_sync(iscsi, url->lun, 0, 0);
	if (task == NULL || task->status != SCSI_STATUS_GOOD) {
		fprintf(stderr, "READ CAPACITY(10) failed: %s\n", iscsi_get_error(iscsi));
		return 1;
	}
	struct scsi_readcapacity10 *capacity = scsi_datain_unmarshall(task);
	if (capacity == NULL) {
		fprintf(stderr, "cannot read the answer\n");
		return 1;
	}
	printf("blocks %u block_size %u\n", capacity->lba + 1, capacity->block_size);
	scsi_free_scsi_task(task);
	iscsi_logout_sync(iscsi);
	iscsi_destroy_url(url);
	iscsi_destroy_context(iscsi);
	return 0;
}
