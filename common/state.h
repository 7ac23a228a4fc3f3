/* Shared state in C used by the native engine: the queue journal (common/journal.py layout). */
#ifndef VFS_STATE_H
#define VFS_STATE_H
#include <stdint.h>
int  vfs_lock(uint32_t *word, uint32_t me);
void vfs_unlock(uint32_t *word);
struct vfs_arena {
    uint8_t *base; uint64_t size;
    uint32_t max_inodes, buckets, max_handles, max_queues;
    uint64_t inodes_off, index_off, handles_off;
    uint32_t pid;
};
int  vfs_arena_attach(struct vfs_arena *a, void *base, uint64_t size, uint32_t pid);
int  vfs_inode_acquire(struct vfs_arena *a, uint64_t nodeid, int *fd);
int  vfs_inode_release(struct vfs_arena *a, uint64_t nodeid);
void vfs_counter_add(struct vfs_arena *a, uint32_t queue, uint64_t n);
struct vfs_jq {
    uint8_t *base; uint32_t capacity;
    int32_t head; uint64_t word;
};
int      vfs_jq_attach(struct vfs_jq *q, void *region, uint32_t capacity);
uint64_t vfs_jq_popped(struct vfs_jq *q, uint16_t head, uint16_t pos, uint32_t opcode,
                       uint64_t unique, int effects);
void     vfs_jq_replied(struct vfs_jq *q, uint16_t head, uint32_t used_len, uint16_t used_idx);
void     vfs_jq_pushed(struct vfs_jq *q, uint16_t head);
int      vfs_jq_pin(struct vfs_jq *q, int kind, uint64_t ident);
void     vfs_jq_unpin(struct vfs_jq *q, int kind, uint64_t ident);
#endif
